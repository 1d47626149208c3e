"""ONNX export of every stage (tiny config), ONNX Runtime parity, the episode runner, verify, errors."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from fssam_deploy.backends.onnxruntime import onnx_episode
from fssam_deploy.backends.onnxruntime.runner import OnnxRuntimeRunner
from fssam_deploy.cli import main
from fssam_deploy.episode import run_stage
from fssam_deploy.errors import EngineError, InputError
from fssam_deploy.hostinfo import host_summary
from fssam_deploy.model import FSSAMConfig, Pipeline, build_stages, random_weights
from fssam_deploy.onnx.export import check_graph, export_onnx, read_manifest
from fssam_deploy.onnx.plugin_variant import PLUGIN_MANIFEST, read_plugin_variants
from fssam_deploy.stages import STAGE_SPECS, stage_module
from tests.helpers import assert_bf16_rounded_close, folder_files, make_episode

TINY = ["--sam2-config", "sam2_hiera_t", "--dino", "dinov2_vits14", "--image-size", "256"]


@pytest.fixture(scope="module")
def engine_dir(tiny_graphs):
    """All six graphs, dynamic batch, exported through the CLI (`fssam export`): the session's tiny graphs."""
    return tiny_graphs


@pytest.fixture(scope="module")
def stages(tiny_cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_stages(random_weights(tiny_cfg, 0), attention_backend="torch")


def test_graphs_and_manifest(engine_dir, tiny_cfg):
    m = read_manifest(engine_dir, expect=tiny_cfg)
    assert set(m["stages"]) == set(STAGE_SPECS) and m["batch"] == "dynamic" and m["weights"] == "random:0"
    for name, entry in m["stages"].items():
        path = engine_dir / entry["file"]
        check_graph(path)  # onnx.checker full check + standard domains only
        assert entry["nodes"] <= entry["nodes_before_onnxslim"]
        assert [i["name"] for i in entry["inputs"]] == STAGE_SPECS[name].input_names
        assert entry["inputs"][0]["shape"][0] == "batch"
    assert not list(engine_dir.parent.glob(".graphs.*")), "temporary export dir left behind"


def test_weights_stored_once_and_every_file_listed(engine_dir):
    """Each graph holds its weights inside (no `.onnx.data` beside it), and the folder holds nothing the manifests
    (the graphs' and the plugin variants') do not list."""
    m = read_manifest(engine_dir)
    variants = read_plugin_variants(engine_dir)
    listed = m.listed_files() | {PLUGIN_MANIFEST} | {e["file"] for e in variants["stages"].values()}
    assert folder_files(engine_dir) == listed, folder_files(engine_dir) ^ listed
    assert not list(engine_dir.glob("*.data"))
    for name in m["stages"]:
        assert "data_files" not in m["stages"][name]  # under protobuf's 2 GB: one file per stage


def test_large_graph_keeps_weights_in_one_data_file(tmp_path, monkeypatch):
    """Past protobuf's limit a graph is saved as .onnx + one .data, and the manifest entry hashes both."""
    import onnx

    from fssam_deploy.onnx import graphs

    w = onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    node = onnx.helper.make_node("MatMul", ["x", "w"], ["y"])
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [w]))
    path = tmp_path / "big.onnx"
    (tmp_path / "big.onnx.data").write_bytes(b"stale sidecar from the exporter")
    monkeypatch.setattr(graphs, "PROTOBUF_LIMIT", 100)
    graphs.save_graph(model, path)
    entry = graphs.file_entries(path)
    assert sorted(folder_files(tmp_path)) == ["big.onnx", "big.onnx.data"]
    assert list(entry["data_files"]) == ["big.onnx.data"] and entry["file"] == "big.onnx"
    monkeypatch.setattr(graphs, "PROTOBUF_LIMIT", 2**31)
    graphs.save_graph(model, path)  # back under the limit: the sidecar goes
    assert sorted(folder_files(tmp_path)) == ["big.onnx"] and "data_files" not in graphs.file_entries(path)


def runner(engine_dir, cfg, name, shots=None):
    spec = STAGE_SPECS[name]
    k = shots or cfg.shots
    r = OnnxRuntimeRunner(engine_dir / f"{name}.onnx", spec,
                          lambda b: {t.name: t.concrete(cfg, b, k) for t in spec.outputs})
    r.activate()
    return r


@pytest.mark.parametrize("batch", [1, 3])
def test_stage_parity_dynamic_batch(engine_dir, tiny_cfg, stages, batch):
    for name, spec in STAGE_SPECS.items():
        if name == "dino_features" and batch == 3:
            continue  # DINOv2 at 560 px is the slow one on a CPU; batch 3 is covered by the episode test
        feed = spec.dummy_inputs(tiny_cfg, batch, tiny_cfg.shots, seed=batch)
        got = run_stage(runner(engine_dir, tiny_cfg, name), feed)
        with torch.inference_mode():
            ref = stage_module(stages, name)(*feed.values())
        for out, r in zip(spec.output_names, ref if isinstance(ref, tuple) else (ref,)):
            assert got[out].shape == r.shape, (name, out)
            if spec.output(out).bf16_rounded:
                assert_bf16_rounded_close(got[out], r, f"{name}.{out}")
                continue
            err = (got[out] - r).abs().max().item() / max(r.abs().max().item(), 1e-6)
            assert err <= 1e-4, (name, out, err)


def test_episode_matches_pipeline(engine_dir, tiny_cfg):
    episode = onnx_episode(engine_dir, expect=tiny_cfg)
    pipe = Pipeline(random_weights(tiny_cfg, 0), attention_backend="torch")
    q, sx, sy = make_episode(tiny_cfg, batch=3, seed=5)
    got, ref = episode.segment(q, sx, sy), pipe.segment(q, sx, sy)
    assert (got - ref).abs().max() <= 1e-3
    assert torch.equal(got > 0, ref > 0)
    torch.testing.assert_close(episode.with_supports(sx[:1], sy[:1]).segment(q[:1]), got[:1], atol=1e-5, rtol=0)


def test_support_session_runs_dino_on_supports_once(engine_dir, tiny_cfg):
    """A support session computes the supports' DINOv2 features once; queries then run it on themselves only."""
    episode = onnx_episode(engine_dir, expect=tiny_cfg)
    seen = []
    dino = episode.runners["dino_features"]
    infer = dino.infer
    dino.infer = lambda feed: (seen.append(feed["images"].clone()), infer(feed))[1]
    q, sx, sy = make_episode(tiny_cfg, batch=2, seed=8)
    session = episode.with_supports(sx[:1], sy[:1])
    cached = [session.segment(q[i : i + 1]) for i in range(2)]
    assert len(seen) == 3, f"DINOv2 ran {len(seen)} times for one support set and 2 queries, expected 3"
    assert torch.equal(seen[0], sx[0]) and torch.equal(seen[1], q[:1]) and torch.equal(seen[2], q[1:])
    for i in range(2):
        uncached = episode.segment(q[i : i + 1], sx[:1], sy[:1])
        torch.testing.assert_close(cached[i], uncached, atol=1e-5, rtol=0)
    assert len(seen) == 7  # without the session, every episode runs DINOv2 on its supports again
    torch.testing.assert_close(session.segment(q), torch.cat(cached), atol=1e-4, rtol=1e-4)


def test_verify_cli_passes(engine_dir, tmp_path, capsys):
    assert main(["verify", "--engine-dir", str(engine_dir), "--json", str(tmp_path / "v.json")]) == 0
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["passed"] and report["episode"]["iou"] >= 0.999
    assert report["host"] == host_summary()  # the machine the ms columns were measured on
    assert report["device"] == "cpu" and not list(tmp_path.glob(".v.json.fssam-tmp-*"))
    memory = next(r for r in report["stages"] if r["output"] == "memory")
    assert 0.0 <= memory["off"] < 1e-3 and "of elements" in memory["target"], memory
    assert "PASS" in capsys.readouterr().out


def test_run_cli_onnxruntime(engine_dir, tmp_path):
    from PIL import Image

    from fssam_deploy.synthetic import synthetic_episode

    q, _, sups, masks = synthetic_episode(256, 1, seed=3)
    Image.fromarray(q).save(tmp_path / "q.png")
    Image.fromarray(sups[0]).save(tmp_path / "s.png")
    Image.fromarray((masks[0] * 255).astype("uint8")).save(tmp_path / "m.png")
    common = ["--query", str(tmp_path / "q.png"), "--support", str(tmp_path / "s.png"),
              "--support-mask", str(tmp_path / "m.png")]
    assert main(["run", *TINY, "--backend", "onnxruntime", "--engine-dir", str(engine_dir), *common,
                 "--out", str(tmp_path / "ort.png"), "--logits", str(tmp_path / "ort.npy")]) == 0
    assert main(["run", *TINY, *common, "--out", str(tmp_path / "pt.png"), "--logits", str(tmp_path / "pt.npy")]) == 0
    import numpy as np

    a, b = np.load(tmp_path / "ort.npy"), np.load(tmp_path / "pt.npy")
    assert np.abs(a - b).max() <= 1e-3 and ((a > 0) == (b > 0)).all()


def test_5shot_stages(tmp_path):
    cfg = FSSAMConfig.from_name("tiny", shots=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export_onnx(cfg, tmp_path / "g5", seed=1, stages=["prior", "refinement", "decoder"], progress=False)
        stages = build_stages(random_weights(cfg, 1), attention_backend="torch")
    for name in ("prior", "refinement", "decoder"):
        spec = STAGE_SPECS[name]
        feed = spec.dummy_inputs(cfg, 2, 5)  # static batch 1: the runner splits a batch of 2
        got = run_stage(runner(out, cfg, name, shots=5), feed)
        with torch.inference_mode():
            ref = stage_module(stages, name)(*feed.values())
        for out_name, r in zip(spec.output_names, ref if isinstance(ref, tuple) else (ref,)):
            assert (got[out_name] - r).abs().max() <= 1e-4 * r.abs().max(), (name, out_name)
    with pytest.raises(EngineError, match=r"no 'dino_features', 'image_encoder', 'memory_encoder' "
                                          r"stage \(built: .*an episode needs every stage"):
        read_manifest(out)


def test_errors(engine_dir, tiny_cfg, tmp_path):
    with pytest.raises(EngineError, match="for another config.*'shots': \\(1, 5\\)"):
        read_manifest(engine_dir, expect=tiny_cfg.replace(shots=5))
    broken = tmp_path / "broken"
    shutil.copytree(engine_dir, broken)
    (broken / "decoder.onnx").unlink()
    with pytest.raises(EngineError, match="decoder.onnx: graph of stage 'decoder' is missing"):
        onnx_episode(broken)
    with pytest.raises(EngineError, match="no manifest"):
        read_manifest(tmp_path)
    r = runner(engine_dir, tiny_cfg, "refinement")
    feed = STAGE_SPECS["refinement"].dummy_inputs(tiny_cfg, 1, 1)
    feed["query_fg_memory"] = feed["query_fg_memory"][..., :8]
    with pytest.raises(InputError, match=r"input 'query_fg_memory' has shape \(1, 64, 16, 8\), the graph expects"):
        r.infer(feed)
    feed.pop("prior_ae")
    with pytest.raises(InputError, match=r"missing \['prior_ae'\]"):
        r.infer(feed)
