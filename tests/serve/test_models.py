"""The served models without a server: request checks, batching across requests, and `fssam run`'s masks."""

from __future__ import annotations

import numpy as np
import pytest

from fssam_deploy.errors import InputError
from fssam_deploy.serve.codec import Limits
from fssam_deploy.serve.models import FSSAMService


def _b(*items):
    return np.array([list(items)], dtype=object)  # (1, n) BYTES


@pytest.fixture(scope="module")
def service(tiny_pipeline, tmp_path_factory):
    return FSSAMService(tiny_pipeline, "random:0", limits=Limits(max_request_bytes=1 << 20, max_supports=3),
                        registry=tmp_path_factory.mktemp("reg"))


def _support_req(files, e):
    return {"supports": _b(*[p.read_bytes() for p in files["supports"][e]]),
            "support_masks": _b(*[p.read_bytes() for p in files["masks"][e]])}


def test_same_masks_as_fssam_run(service, tiny_pipeline, episode_files):
    """fssam_segment and fssam_segment_cached give what `fssam run` computes from the same files."""
    from fssam_deploy.episode_files import load_supports, segment_queries

    f = episode_files
    sup = load_supports(f["supports"][0], f["masks"][0], tiny_pipeline.cfg.image_size)
    ref = next(segment_queries(tiny_pipeline, sup, [f["query"][0]]))
    q = {"query": _b(f["query"][0].read_bytes())}
    (seg,) = service.infer_segment([{**q, **_support_req(f, 0)}])
    (reg,) = service.infer_register([_support_req(f, 0)])
    sid = reg["support_id"][0, 0]
    (cached,) = service.infer_segment_cached([{**q, "support_id": np.array([[sid]], dtype=object)}])
    for out in (seg, cached):
        assert out["error"][0, 0] == b""
        assert out["mask"][0].shape == ref.mask.shape == (200, 300)
        np.testing.assert_array_equal(out["mask"][0].astype(bool), ref.mask)
        np.testing.assert_allclose(out["logits"][0], ref.logits, atol=1e-5)
    assert 0.0 < ref.mask.mean() < 1.0  # random weights, but a mask with both classes: the comparison means something


def test_batched_equals_unbatched(service, episode_files):
    """Queries against different support sets in one call give what each gives alone."""
    f = episode_files
    ids = [service.infer_register([_support_req(f, e)])[0]["support_id"][0, 0] for e in range(2)]
    reqs = [{"query": _b(f["query"][e].read_bytes()), "support_id": np.array([[ids[1 - e]]], dtype=object)}
            for e in range(2)]  # two queries of different sizes against two support sets
    alone = [service.infer_segment_cached([r])[0] for r in reqs]
    calls = len(service.batch_sizes["fssam_segment_cached"])
    together = service.infer_segment_cached(reqs)
    assert service.batch_sizes["fssam_segment_cached"][calls:] == [2]
    for a, t in zip(alone, together):
        np.testing.assert_array_equal(a["mask"], t["mask"])
        np.testing.assert_allclose(a["logits"], t["logits"], atol=1e-4)


BAD = [
    ({"query": _b(b"not an image")}, "input 'query'\\[0\\]: cannot read image"),
    ({"query": _b(b"")}, "input 'query'\\[0\\] is empty"),
    ({"query_raw": np.zeros((1, 5, 5), np.uint8)}, "'query_raw' has shape \\(1, 5, 5\\) \\(rank 3\\), expected rank 4"),
    ({"query_raw": np.zeros((1, 5, 5, 4), np.uint8)}, "'query_raw' has 4 channels"),
    ({"query_raw": np.full((1, 5, 5, 3), np.nan, np.float32)}, "'query_raw' has dtype float32, expected uint8"),
    ({"query_raw": np.zeros((1, 0, 5, 3), np.uint8)}, "empty image"),
    ({"query_raw": np.zeros((1, 2000, 2000, 3), np.uint8)}, "over the server's limit of 1.0 MiB"),
    ({}, "got neither of 'query'"),
    ({"query": _b(b"x"), "query_raw": np.zeros((1, 5, 5, 3), np.uint8)}, "got both of 'query'"),
]


@pytest.mark.parametrize("query,match", BAD)
def test_bad_queries(service, episode_files, query, match):
    sid = service.infer_register([_support_req(episode_files, 0)])[0]["support_id"][0, 0]
    with pytest.raises(InputError, match=match):
        service.infer_segment_cached([{**query, "support_id": np.array([[sid]], dtype=object)}])


def test_bad_supports(service, episode_files):
    f = episode_files
    s0, m0 = (p.read_bytes() for p in (f["supports"][0][0], f["masks"][0][0]))
    m_other = f["masks"][1][0].read_bytes()  # 240x180 mask for a 200x300 support
    cases = [({"supports": _b(s0, s0), "support_masks": _b(m0)}, "2 support image\\(s\\) in 'supports' but 1 mask"),
             ({"supports": _b(s0), "support_masks": _b(m_other)}, "'support_masks'\\[0\\] is 180x240 .* is 300x200"),
             ({"supports": _b(s0), "support_masks": _b(b"junk")}, "'support_masks'\\[0\\]: cannot read mask"),
             ({"supports": _b(*[s0] * 4), "support_masks": _b(*[m0] * 4)}, "4 supports in one request, over the limit"),
             ({"support_masks": _b(m0)}, "neither of 'supports'"),
             ({"supports_raw": np.zeros((1, 1, 8, 8, 3), np.uint8),
               "support_masks_raw": np.zeros((1, 1, 8, 9), np.uint8)}, "'support_masks_raw'\\[0\\] is 9x8 .* is 8x8")]
    for req, match in cases:
        with pytest.raises(InputError, match=match):
            service.infer_register([req])
    with pytest.raises(InputError, match="support_id 'nope': not a support id"):
        service.infer_segment_cached([{"query": _b(f["query"][0].read_bytes()),
                                       "support_id": np.array([[b"nope"]], dtype=object)}])
    with pytest.raises(InputError, match=f"support_id {'0' * 64}: unknown support set"):
        service.infer_segment_cached([{"query": _b(f["query"][0].read_bytes()),
                                       "support_id": np.array([[b"0" * 64]], dtype=object)}])


def test_mixed_batch_keeps_good_requests(service, episode_files):
    """A bad request batched with good ones fails alone (its `error` output); the good ones are answered."""
    f = episode_files
    sid = service.infer_register([_support_req(f, 0)])[0]["support_id"][0, 0]
    good = {"query": _b(f["query"][0].read_bytes()), "support_id": np.array([[sid]], dtype=object)}
    bad = {"query": _b(b"junk"), "support_id": np.array([[sid]], dtype=object)}
    out = service.infer_segment_cached([good, bad, good])
    assert out[1]["error"][0, 0].startswith(b"fssam_segment_cached input 'query'[0]: cannot read image")
    assert out[1]["mask"].shape == (1, 1, 1)
    for i in (0, 2):
        assert out[i]["error"][0, 0] == b"" and out[i]["mask"].shape == (1, 200, 300)
    # PyTriton's shared-memory store cannot hold a zero-size array: one would fail the whole batch on the wire
    assert all(a.size > 0 for r in out for a in r.values())
    assert service.partial_failures["fssam_segment_cached"] >= 1
    with pytest.raises(InputError, match="every request of this batch failed: request 0: .* \\| request 1: "):
        service.infer_segment_cached([bad, bad])


def test_engine_shots_checked_before_encoding(tiny_graphs, tiny_cfg, episode_files):
    """An engine exported for K shots refuses another count at register / segment, naming both (before the supports
    are encoded); K supports pass. The PyTorch pipeline takes any count."""
    from fssam_deploy.backends.registry import open_backend

    f = episode_files
    with open_backend("onnxruntime", tiny_cfg, engine_dir=str(tiny_graphs)) as ep:
        assert ep.fixed_shots() == tiny_cfg.shots == 1
        svc = FSSAMService(ep, "random:0")
        two = _support_req(f, 0)  # 2 shots
        for call, req in ((svc.infer_register, two), (svc.infer_segment, {"query": _b(f["query"][0].read_bytes()),
                                                                           **two})):
            with pytest.raises(InputError, match=r"2 support image\(s\).*onnxruntime engine was built for 1 shot"):
                call([req])
        one = {k: v[:, :1] for k, v in two.items()}
        (reg,) = svc.infer_register([one])
        assert reg["error"][0, 0] == b"" and len(reg["support_id"][0, 0]) == 64


def test_warm_up_is_one_uncounted_request(service, tiny_cfg, monkeypatch):
    """The server's warm-up: what one fssam_segment request computes, at the engine's shots (a fixed K wins over
    the config's), stored nowhere and counted in no statistics; `fssam serve --no-warmup` turns it off."""
    from fssam_deploy.cli import make_parser
    from fssam_deploy.serve.cli import _settings

    shots, real = [], service._encode
    monkeypatch.setattr(service, "_encode", lambda sets: shots.append(len(sets[0][0])) or real(sets))
    before = {k: list(v) for k, v in service.batch_sizes.items()}
    stored = (list(service.store._mem), service.store.ids_on_disk())
    assert service.warm_up() > 0
    monkeypatch.setattr(service, "shots", 2)
    service.warm_up()
    assert shots == [tiny_cfg.shots, 2]
    assert service.batch_sizes == before and (list(service.store._mem), service.store.ids_on_disk()) == stored
    assert _settings(make_parser().parse_args(["serve"])).warmup is True
    assert _settings(make_parser().parse_args(["serve", "--no-warmup"])).warmup is False
