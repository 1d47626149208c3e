"""The service over the wire (PyTriton, HTTP and gRPC on loopback): register, segment, bad requests, concurrency."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

pytestmark = pytest.mark.pytriton
pytest.importorskip("pytriton", reason="the live-server tests need the serving environment (nvidia-pytriton, "
                    "numpy<2): bash quickstart.sh test-serve")
pytest.importorskip("tritonclient.http")

from fssam_deploy.errors import InputError  # noqa: E402


@pytest.fixture(scope="module")
def reference(tiny_pipeline, episode_files):
    """What `fssam run` writes for episode 0 (mask, logits), in-process."""
    from fssam_deploy.episode_files import load_supports, segment_queries

    f = episode_files
    sup = load_supports(f["supports"][0], f["masks"][0], tiny_pipeline.cfg.image_size)
    return next(segment_queries(tiny_pipeline, sup, [f["query"][0]]))


def test_register_and_segment_match_fssam_run(client, episode_files, reference, registry_dir):
    f = episode_files
    sid = client.register(f["supports"][0], f["masks"][0])
    assert (registry_dir / f"{sid}.safetensors").is_file()  # on disk when register returns
    assert client.register(f["supports"][0], f["masks"][0]) == sid  # content hash: same set, same id
    for mask, logits in (client.segment(f["query"][0], support_id=sid),
                         client.segment(f["query"][0], supports=f["supports"][0], masks=f["masks"][0])):
        np.testing.assert_array_equal(mask, reference.mask)
        np.testing.assert_allclose(logits, reference.logits, atol=1e-5)


def test_raw_arrays_and_grpc(server, episode_files, reference):
    from fssam_deploy.client import FSSAMClient
    from fssam_deploy.imageio import read_image, read_mask

    f = episode_files
    with FSSAMClient(server.grpc_url, protocol="grpc", timeout_s=300) as c:
        sid = c.register([read_image(p) for p in f["supports"][0]], [read_mask(p) for p in f["masks"][0]])
        mask, _ = c.segment(read_image(f["query"][0]), support_id=sid)
    np.testing.assert_array_equal(mask, reference.mask)


def _raw(client, model, inputs):
    return client.infer(model, [client._input(n, a) for n, a in inputs.items()], ["mask", "logits", "error"])


def _disconnect_mid_request(host_port: str) -> None:
    host, port = host_port.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v2/models/fssam_segment_cached/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: 100000\r\n\r\n{\"inputs\": [{\"name\": \"query\", ")


def test_bad_requests_never_take_it_down(server, client, episode_files, reference):
    f = episode_files
    sid = client.register(f["supports"][0], f["masks"][0])
    q = np.array([[f["query"][0].read_bytes()]], dtype=object)
    ok = lambda: np.testing.assert_array_equal(client.segment(f["query"][0], support_id=sid)[0], reference.mask)  # noqa: E731
    sid_in = np.array([[sid.encode()]], dtype=object)
    cases = [
        ({"query_raw": np.full((1, 8, 8, 3), np.nan, np.float32), "support_id": sid_in},
         "(?s)(?=.*query_raw)(?=.*UINT8)"),
        ({"query_raw": np.zeros((1, 8, 8), np.uint8), "support_id": sid_in}, "(?s)(?=.*query_raw)(?=.*shape)"),
        ({"query": np.array([[b"\x89PNG garbage"]], dtype=object), "support_id": sid_in}, "cannot read image"),
        ({"query": q, "support_id": np.array([[b"f" * 64]], dtype=object)}, f"support_id {'f' * 64}: unknown"),
        ({"query_raw": np.zeros((1, 1200, 1200, 3), np.uint8), "support_id": sid_in}, "over the server's limit of 4.0"),
    ]
    for inputs, match in cases:
        with pytest.raises(InputError, match=match):
            _raw(client, "fssam_segment_cached", inputs)
        ok()
    with pytest.raises(InputError, match="1 support image\\(s\\) in 'supports' but 2 mask"):
        client.segment(f["query"][0], supports=f["supports"][0][:1], masks=f["masks"][0])
    with pytest.raises(InputError, match="'support_masks'\\[0\\] is 180x240"):
        client.register(f["supports"][0][:1], f["masks"][1][:1])
    _disconnect_mid_request(server.http_url)
    ok()
    assert server.is_alive()


def test_concurrent_clients(server, episode_files, reference):
    """8 threads, each its own client, cached and uncached against two support sets: every mask right."""
    from fssam_deploy.client import FSSAMClient
    from fssam_deploy.episode_files import load_supports, segment_queries

    f = episode_files
    pipe = server.service.episode
    refs = [next(segment_queries(pipe, load_supports(f["supports"][e], f["masks"][e], pipe.cfg.image_size),
                                 [f["query"][1 - e]])).mask for e in range(2)]
    with FSSAMClient(server.http_url, timeout_s=300) as c:
        ids = [c.register(f["supports"][e], f["masks"][e]) for e in range(2)]
    calls = len(server.service.batch_sizes["fssam_segment_cached"])
    errors, done = [], []

    def work(t):
        try:
            with FSSAMClient(server.http_url, timeout_s=300) as c:
                for i in range(3):
                    e = (t + i) % 2
                    mask, _ = c.segment(f["query"][1 - e], support_id=ids[e])
                    np.testing.assert_array_equal(mask, refs[e])
                    done.append(t)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:3]
    assert len(done) == 24
    sizes = server.service.batch_sizes["fssam_segment_cached"][calls:]
    assert sum(sizes) == 24 and max(sizes) > 1, sizes  # dynamic batching joined requests


def test_bad_request_batched_with_good_ones(server, episode_files, reference):
    """A bad request that the dynamic batcher joins with good ones fails alone over the wire; the good ones get
    their masks (an error response's arrays must not be zero-size: PyTriton's shared-memory store refuses those,
    which once failed whole batches)."""
    from fssam_deploy.client import FSSAMClient

    f = episode_files
    with FSSAMClient(server.http_url, timeout_s=300) as c:
        sid = c.register(f["supports"][0], f["masks"][0])
    unknown = np.array([[b"e" * 64]], dtype=object)
    q = np.array([[f["query"][0].read_bytes()]], dtype=object)
    before = server.service.partial_failures["fssam_segment_cached"]
    errors, good, bad = [], [], []

    def good_work():
        try:
            with FSSAMClient(server.http_url, timeout_s=300) as c:
                for _ in range(2):
                    np.testing.assert_array_equal(c.segment(f["query"][0], support_id=sid)[0], reference.mask)
                    good.append(1)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def bad_work():
        try:
            with FSSAMClient(server.http_url, timeout_s=300) as c:
                for _ in range(3):
                    time.sleep(1.0)  # both instances busy with good requests: it queues with others
                    with pytest.raises(InputError, match=f"support_id {'e' * 64}: unknown"):
                        _raw(c, "fssam_segment_cached", {"query": q, "support_id": unknown})
                    bad.append(1)
        except BaseException as exc:  # noqa: BLE001 - pytest.raises' failure is a BaseException; reported below
            errors.append(exc)

    for _ in range(3):  # until the batcher has joined a bad request with good ones (the first round, in practice)
        threads = [threading.Thread(target=good_work) for _ in range(8)] + [threading.Thread(target=bad_work)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not errors, errors[:3]
        if server.service.partial_failures["fssam_segment_cached"] > before:
            break
    assert server.service.partial_failures["fssam_segment_cached"] > before, "no mixed batch formed"
    assert len(good) % 16 == 0 and len(bad) % 3 == 0 and good and bad
    assert server.is_alive()


def test_warmed_up_before_listening(server):
    """The server ran its warm-up episode (`warm_up`) before it listened."""
    assert server.warmup_s is not None and server.warmup_s > 0


def test_stats_and_metrics(server, client):
    import urllib.request

    stats = client.stats("fssam_segment_cached")
    assert stats["model_stats"][0]["name"] == "fssam_segment_cached"
    with urllib.request.urlopen(server.metrics_url, timeout=30) as r:
        assert b"nv_inference_request_success" in r.read()
