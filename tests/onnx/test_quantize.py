"""int8 engine dirs (export/quantize.py), tiny config on the CPU: graphs, manifest, episode parity, atomicity, errors.

Parity thresholds for the default int8 engine against fp32 ONNX Runtime: mask IoU >= 0.97 and max
logit error <= 5% of the logits' scale. Measured with these random weights on `make_episode`
episodes (seeds 1-3, 6 masks): IoU 0.993-0.999, error 0.3-0.9% of the scale; on the benchmark's
synthetic episodes (benchmarks/bench_int8.py) IoU 0.989. Masks' edges move by a pixel here and
there; a quantizer that breaks a layer (a wrong transpose or scale) gives IoU far below.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings

import numpy as np
import pytest
import torch

from fssam_deploy.backends.onnxruntime import onnx_episode
from fssam_deploy.backends.onnxruntime.runner import OnnxRuntimeRunner
from fssam_deploy.errors import ConfigError, EngineError
from fssam_deploy.model.checkpoint import file_sha256
from fssam_deploy.onnx import quantize as q
from fssam_deploy.onnx.export import MANIFEST, read_manifest
from fssam_deploy.stages import STAGE_SPECS
from tests.helpers import make_episode

MIN_IOU = 0.97


@pytest.fixture(scope="module")
def fp32_dir(tiny_graphs):
    return tiny_graphs  # the session's tiny fp32 graphs (dynamic batch, seed 0), read-only


@pytest.fixture(scope="module")
def int8_dir(fp32_dir, tmp_path_factory):
    return q.quantize_engine_dir(fp32_dir, tmp_path_factory.mktemp("int8") / "int8")


@pytest.fixture(scope="module")
def fp32_episode(fp32_dir, tiny_cfg):
    return onnx_episode(fp32_dir, expect=tiny_cfg)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0, b > 0
    return (a & b).sum().item() / max((a | b).sum().item(), 1)


def test_manifest_and_integer_ops(fp32_dir, int8_dir, tiny_cfg):
    src, m = read_manifest(fp32_dir), read_manifest(int8_dir, expect=tiny_cfg)
    chosen = q.default_stages(src)
    assert chosen == ["image_encoder", "dino_features" if "dino_features" in src["stages"] else "prior"]
    assert m["precision"] == "int8" and m["source"]["precision"] == "fp32"
    assert m["source"]["manifest_sha256"] == file_sha256(fp32_dir / MANIFEST)
    rest = lambda d: {k: v for k, v in d.items() if k not in ("precision", "source", "stages", "versions")}  # noqa: E731
    assert rest(m) == rest(src) and m["versions"]["onnxruntime"]
    for name, entry in m["stages"].items():
        path = int8_dir / entry["file"]
        assert file_sha256(path) == entry["sha256"], name
        found = q.integer_ops(path)
        if name in chosen:
            assert entry["quantized"]["method"] == "dynamic" and entry["quantized"]["fp32_sha256"] == \
                src["stages"][name]["sha256"] != entry["sha256"]
            assert found == entry["quantized"]["integer_ops"] and found["MatMulInteger"] > 0
            assert set(found) <= {"MatMulInteger", "DynamicQuantizeLinear"}
        else:
            assert not found and entry == src["stages"][name], name
    assert not [p.name for p in int8_dir.parent.iterdir() if p.name.startswith(".")], "temporary dir left behind"


def test_fp32_cone_keeps_high_res_features_fp32(int8_dir):
    import onnx

    model = onnx.load(str(int8_dir / "image_encoder.onnx"), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}

    def ancestor_ops(output):
        ops, todo, seen = [], [output], set()
        while todo:
            node = producer.get(todo.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                ops.append(node.op_type)
                todo.extend(node.input)
        return ops

    for out in q.FP32_CONES["image_encoder"]:
        assert not set(ancestor_ops(out)) & q.INTEGER_OPS, out
        assert "MatMul" in ancestor_ops(out)  # the cone's linear layers are there, in fp32
    assert "MatMulInteger" in ancestor_ops("feat")


def test_episode_close_to_fp32(fp32_episode, int8_dir, tiny_cfg):
    qx, sx, sy = make_episode(tiny_cfg, batch=2, seed=1)  # dynamic-batch graphs, two episodes at once
    a, b = fp32_episode.segment(qx, sx, sy), onnx_episode(int8_dir, expect=tiny_cfg).segment(qx, sx, sy)
    for i in range(2):
        assert (a[i] > 0).sum() > 0 and not torch.equal(a[i], b[i])  # a mask to compare, and int8 really ran
        assert iou(b[i], a[i]) >= MIN_IOU, (i, iou(b[i], a[i]))
        assert (a[i] - b[i]).abs().max() <= 0.05 * a[i].abs().max(), i


def test_weight_type_follows_the_cpu(fp32_dir, int8_dir, tiny_cfg, tmp_path, monkeypatch):
    """auto: qint8 where the u8 x s8 dot product accumulates in int32 (VNNI / AMX-INT8), quint8 where it saturates;
    qint8 graphs loaded on a saturating CPU warn."""
    import fssam_deploy.hostinfo as hostinfo
    from fssam_deploy.hostinfo import int8_dot_saturates

    entry = read_manifest(int8_dir)["stages"]["image_encoder"]["quantized"]
    assert entry["weight_type"] == ("quint8" if int8_dot_saturates() else "qint8")
    assert entry["weight_type_auto"].startswith(entry["weight_type"] + ": ")
    for saturates, want in ((True, "quint8"), (False, "qint8")):
        monkeypatch.setattr(hostinfo, "int8_dot_saturates", lambda s=saturates: s)
        assert q.auto_weight_type()[0] == want
        assert q.quant_settings("dynamic", "auto", True, 1, 0)["weight_type"] == want
        assert q.quant_settings("dynamic", "qint8", True, 1, 0)["weight_type"] == "qint8"  # asked for: kept
    signed = q.quantize_engine_dir(fp32_dir, tmp_path / "signed", stages=["image_encoder"], weight_type="qint8")
    monkeypatch.setattr(hostinfo, "int8_dot_saturates", lambda: True)
    with pytest.warns(UserWarning, match=r"stages \['image_encoder'\] have qint8 weights, whose int8 dot product "
                      r"saturates on .*no VNNI"):
        onnx_episode(signed, expect=tiny_cfg)
    monkeypatch.setattr(hostinfo, "int8_dot_saturates", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        onnx_episode(signed, expect=tiny_cfg)


def test_static_method(fp32_dir, fp32_episode, tiny_cfg, tmp_path):
    """QDQ with calibration: only the image encoder's graph, checked on its own. `feat` (int8 layers): relative
    error measured 0.01-0.03 of its scale, 0.1 leaves room and still catches a broken layer; the fp32 cone's
    outputs (feat_s0, feat_s1) only see ONNX Runtime's pre-processing fusions."""
    out = q.quantize_engine_dir(fp32_dir, tmp_path / "static", stages=["image_encoder"], method="static",
                                calibration_images=1)
    m = read_manifest(out, expect=tiny_cfg)
    assert [k for k, v in m["stages"].items() if "quantized" in v] == ["image_encoder"]
    assert m["stages"]["image_encoder"]["quantized"]["calibration"]["images"] == 1
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(q.integer_ops(out / "image_encoder.onnx"))
    spec = STAGE_SPECS["image_encoder"]
    runner = OnnxRuntimeRunner(out / "image_encoder.onnx", spec,
                               lambda b: {t.name: t.concrete(tiny_cfg, b, 1) for t in spec.outputs})
    images = make_episode(tiny_cfg, batch=2, seed=1)[0]
    with runner:
        got = runner.infer({"images": images})
    ref = fp32_episode.runners["image_encoder"].infer({"images": images})
    for name, r in ref.items():
        err = (got[name] - r).abs().max() / r.abs().max()
        assert err <= 1e-5 if name in q.FP32_CONES["image_encoder"] else 0 < err <= 0.1, (name, err)


def test_gemm_as_matmul_same_outputs():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((6, 4), dtype=np.float32), rng.standard_normal(6, dtype=np.float32)
    w2, w3 = rng.standard_normal((6, 5), dtype=np.float32), rng.standard_normal((5, 3), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["y1"], name="a", transB=1),  # (2,4) @ (4,6) + b
         helper.make_node("Gemm", ["y1", "w2"], ["y2"], name="b"),  # no bias, no transpose
         helper.make_node("Gemm", ["y2", "w3"], ["y"], name="c", alpha=0.5)],  # alpha != 1: left as Gemm
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (w3, "w3"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.standard_normal((2, 4), dtype=np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    before = run(model)
    assert q.gemm_as_matmul(model) == 2
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add", "MatMul", "Gemm"]
    np.testing.assert_allclose(run(model), before, rtol=1e-5, atol=1e-5)


def test_export_int8(fp32_dir, tiny_cfg, tmp_path, monkeypatch):
    """`fssam export --precision int8`: fp32 export into a temporary folder, quantized into out_dir, folder gone."""
    calls = []

    def fake_export(cfg, out_dir, **kw):  # the module fixture's graphs stand in for a fresh export
        calls.append((cfg, kw))
        return shutil.copytree(fp32_dir, out_dir)

    monkeypatch.setattr(q, "export_onnx", fake_export)
    out = q.export_int8(tiny_cfg, tmp_path / "engine", seed=3, batch="dynamic", stages=["image_encoder"],
                        progress=False)
    assert calls == [(tiny_cfg, {"checkpoint": None, "seed": 3, "opset": 18, "batch": "dynamic", "precision": "fp32",
                                 "progress": False})]
    assert [p.name for p in tmp_path.iterdir()] == ["engine"]
    m = read_manifest(out, expect=tiny_cfg)
    assert m["precision"] == "int8" and [k for k, v in m["stages"].items() if "quantized" in v] == ["image_encoder"]


def test_failure_leaves_nothing_behind(fp32_dir, tmp_path, monkeypatch):
    def broken(src, dst, *args):
        dst.write_bytes(b"half a graph")
        raise RuntimeError("quantizer crashed")

    monkeypatch.setattr(q, "quantize_dynamic_graph", broken)
    dst = tmp_path / "int8"
    with pytest.raises(RuntimeError, match="quantizer crashed"):
        q.quantize_engine_dir(fp32_dir, dst)
    assert list(tmp_path.iterdir()) == []
    dst.mkdir()
    (dst / "keep.txt").write_text("previous engine dir")
    (dst / "manifest.json").write_text('{"format": "fssam-onnx/1"}')  # an engine dir of ours: may be replaced
    with pytest.raises(RuntimeError, match="quantizer crashed"):
        q.quantize_engine_dir(fp32_dir, dst)
    assert [p.name for p in tmp_path.iterdir()] == ["int8"]
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt", "manifest.json"]


def test_errors(fp32_dir, int8_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"stages to quantize \['decoderr'\]: .*manifest.json has stages \["):
        q.quantize_engine_dir(fp32_dir, tmp_path / "a", stages=["image_encoder", "decoderr"])
    with pytest.raises(ConfigError, match=r"quantization method 'int4': choose from \['dynamic', 'static'\]"):
        q.quantize_engine_dir(fp32_dir, tmp_path / "a", method="int4")
    with pytest.raises(ConfigError, match="must differ from its fp32 source dir"):
        q.quantize_engine_dir(fp32_dir, fp32_dir)
    with pytest.raises(EngineError, match=re.escape(f"{tmp_path}: not an engine dir (no manifest.json)")):
        q.quantize_engine_dir(tmp_path, tmp_path / "a")
    with pytest.raises(EngineError, match="manifest.json: precision is 'int8'; int8 graphs are made from an fp32"):
        q.quantize_engine_dir(int8_dir, tmp_path / "a")
    fake = shutil.copytree(int8_dir, tmp_path / "fake_fp32")  # int8 graphs, manifest edited to say fp32
    manifest = json.loads((fake / MANIFEST).read_text())
    (fake / MANIFEST).write_text(json.dumps({**manifest, "precision": "fp32"}))
    with pytest.raises(EngineError, match=r"image_encoder.onnx: stage 'image_encoder' is already quantized "
                                          r"\(integer ops \{'DynamicQuantizeLinear': \d+, 'MatMulInteger'"):
        q.quantize_engine_dir(fake, tmp_path / "a")
    (fake / "decoder.onnx").write_bytes(b"corrupt")
    with pytest.raises(EngineError, match="decoder.onnx: graph of stage 'decoder' does not match the manifest's "
                                          "sha256"):
        q.quantize_engine_dir(fake, tmp_path / "a")
    assert not (tmp_path / "a").exists()
