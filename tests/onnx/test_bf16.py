"""bf16 graphs for TensorRT (export/bf16.py): weights rounded from fp32, ops ONNX allows no bf16 for kept fp32, the
emulation ONNX Runtime runs, the parser's op / type table, and a whole tiny episode through `verify`."""

from __future__ import annotations

import json
import warnings

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fssam_deploy.backends.onnxruntime import onnx_episode
from fssam_deploy.backends.tensorrt.build import typing_plan
from fssam_deploy.backends.tensorrt.ops import initializer_violations, type_violations, unsupported_trt_ops
from fssam_deploy.errors import EngineError
from fssam_deploy.onnx.bf16 import emulate_bf16, to_bf16
from fssam_deploy.onnx.export import check_graph, export_onnx
from fssam_deploy.stages import STAGE_SPECS
from fssam_deploy.verify import TARGETS, verify, verify_variant

F, BF = TensorProto.FLOAT, TensorProto.BFLOAT16


def bf16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def mlp_graph(w1: np.ndarray, w2: np.ndarray, einsum: bool = False) -> onnx.ModelProto:
    """out = LayerNorm(x @ w1) @ w2 (or an Einsum for the second product)."""
    second = (helper.make_node("Einsum", ["n", "w2"], ["out"], equation="ij,jk->ik", name="mm2") if einsum
              else helper.make_node("MatMul", ["n", "w2"], ["out"], name="mm2"))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("LayerNormalization", ["h", "g", "b"], ["n"], axis=-1, epsilon=1e-5, name="ln"),
             second]
    d = w1.shape[1]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.ones(d, np.float32), "g"),
             numpy_helper.from_array(np.zeros(d, np.float32), "b")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", F, [4, w1.shape[0]])],
                              [helper.make_tensor_value_info("out", F, [4, w2.shape[1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_weights_are_rounded_from_fp32_not_clamped_to_fp16(tmp_path):
    g = np.random.default_rng(0)
    w1 = g.standard_normal((8, 16)).astype(np.float32)
    w1[0, 0], w1[1, 1] = 3.0e5, 1.0e-9  # beyond fp16's max, below its smallest subnormal: fine in bf16
    w2 = g.standard_normal((16, 8)).astype(np.float32)
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_graph(w1, w2), path)
    info = to_bf16(path)
    check_graph(path)
    model = onnx.load(str(path))
    weights = {t.name: t for t in model.graph.initializer}
    assert weights["w1"].data_type == weights["w2"].data_type == BF
    np.testing.assert_array_equal(numpy_helper.to_array(weights["w1"]).astype(np.float32), bf16(w1))
    assert info["fp32_ops"] == {"LayerNormalization": 1} and info["bf16_nodes"] == 2
    assert all(v.type.tensor_type.elem_type == F for v in (*model.graph.input, *model.graph.output))
    assert type_violations(path) == [] and unsupported_trt_ops(path) == []


def test_emulation_rounds_what_the_graph_stores_in_bf16(tmp_path):
    g = np.random.default_rng(1)
    w1, w2 = g.standard_normal((8, 16)).astype(np.float32), g.standard_normal((16, 8)).astype(np.float32)
    x = g.standard_normal((4, 8)).astype(np.float32)
    fp32 = mlp_graph(w1, w2)
    path = tmp_path / "mlp.onnx"
    onnx.save(fp32, path)
    to_bf16(path)
    emulated = emulate_bf16(onnx.load(str(path)))
    assert not any(t.data_type == BF for t in emulated.graph.initializer)
    got = run(emulated, {"x": x})[0]
    # by hand: bf16 storage between ops, fp32 arithmetic, LayerNorm in fp32 on the bf16 input
    h = bf16(bf16(x) @ bf16(w1))
    n = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
    want = bf16(bf16(n) @ bf16(w2))
    np.testing.assert_allclose(got, want, rtol=2**-7, atol=1e-6)  # at most one bf16 step (summation order)
    assert np.mean(got == want) > 0.9
    ref = run(fp32, {"x": x})[0]
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert 1e-4 < err < 0.05, err  # rounded (not fp32), but only by bf16's few bits


def test_ops_onnx_allows_no_bf16_for_stay_fp32(tmp_path):
    g = np.random.default_rng(2)
    path = tmp_path / "einsum.onnx"
    onnx.save(mlp_graph(g.standard_normal((8, 16)).astype(np.float32),
                        g.standard_normal((16, 8)).astype(np.float32), einsum=True), path)
    info = to_bf16(path)
    check_graph(path)  # an Einsum on bf16 inputs would not be valid ONNX at opset 18
    assert info["fp32_no_bf16_schema"] == ["Einsum"] and info["fp32_ops"]["Einsum"] == 1


def test_type_violations_name_the_node_and_type(tmp_path):
    x = helper.make_tensor_value_info("x", BF, [1, 1, 4, 4])
    grid = helper.make_tensor_value_info("grid", BF, [1, 4, 4, 2])
    y = helper.make_tensor_value_info("y", BF, [1, 1, 4, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("GridSample", ["x", "grid"], ["y"], name="gs")],
                                                "g", [x, grid], [y]), opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "gs.onnx"
    onnx.save(model, path)
    assert unsupported_trt_ops(path) == []  # the op is on the list ...
    assert type_violations(path) == ["gs (GridSample): input `x` is BF16, the parser takes ['FP32', 'FP16']"]


def test_bf16_engines_are_strongly_typed_from_bf16_graphs():
    assert typing_plan("bf16", "bf16") == {"strongly_typed": True}


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory, tiny_cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_onnx(tiny_cfg, tmp_path_factory.mktemp("bf16") / "graphs", seed=0, batch="dynamic",
                           precision="bf16", progress=False)


def test_bf16_graphs_are_valid_and_take_only_parser_ops_and_types(bf16_dir):
    manifest = json.loads((bf16_dir / "manifest.json").read_text())
    assert manifest["precision"] == "bf16" and set(manifest["stages"]) == set(STAGE_SPECS)
    for name, entry in manifest["stages"].items():
        path = bf16_dir / entry["file"]
        check_graph(path)
        assert unsupported_trt_ops(path) == [] and initializer_violations(path) == [], name
        assert type_violations(path) == [], name
        g = onnx.load(str(path)).graph
        assert all(v.type.tensor_type.elem_type == F for v in (*g.input, *g.output)), name
    big = ("image_encoder", "dino_features", "decoder")
    for name in big:
        entry = manifest["stages"][name]
        assert entry["bf16_nodes"] > entry["fp32_nodes"], (name, entry["bf16_nodes"], entry["fp32_nodes"])
        assert any(t.data_type == BF for t in onnx.load(str(bf16_dir / entry["file"])).graph.initializer), name
    decoder = manifest["stages"]["decoder"]
    for op in ("LayerNormalization", "Softmax", "ReduceMin", "ReduceMax", "ArgMax"):
        assert decoder["fp32_ops"].get(op, 0) > 0, op


def test_bf16_episode_verifies_emulated_and_refuses_to_run_plainly(bf16_dir):
    report = verify(bf16_dir, batch=2, reps=1)
    assert report.precision == "bf16" and report.passed, report.table()
    assert report.episode["iou"] >= 0.98 and "emulation" in report.table()
    with pytest.raises(EngineError, match="bf16 graphs are for TensorRT"):
        onnx_episode(bf16_dir)


def test_bf16_plugin_variant_beside_bf16_graphs(bf16_dir, tiny_cfg):
    """`fssam export --precision bf16 --tensorrt-plugin`: the custom node takes bf16, and the variant's emulation
    (the node run as the PyTorch reference) is as close to PyTorch as the standard bf16 decoder's."""
    import torch

    from fssam_deploy.model import build_stages, random_weights
    from fssam_deploy.onnx.plugin_variant import (
        CUSTOM_NODE,
        custom_nodes,
        export_plugin_variants,
        read_plugin_variants,
    )
    from fssam_deploy.stages import stage_module

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_plugin_variants(tiny_cfg, bf16_dir, seed=0)
    doc = read_plugin_variants(bf16_dir)
    assert doc["precision"] == "bf16" and doc["stages"]["decoder"]["precision"] == "bf16"
    path = bf16_dir / doc["stages"]["decoder"]["file"]
    model = onnx.load(str(path))
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    nodes = custom_nodes(model)
    assert len(nodes) == 4 and all({types[t] for t in (*n.input, *n.output)} == {BF} for n in nodes)
    assert unsupported_trt_ops(path, frozenset({CUSTOM_NODE})) == []
    assert type_violations(path, frozenset({CUSTOM_NODE})) == []

    feed = STAGE_SPECS["decoder"].dummy_inputs(tiny_cfg, 1, tiny_cfg.shots, seed=3)
    with torch.inference_mode():
        decoder = stage_module(build_stages(random_weights(tiny_cfg, 0), attention_backend="torch"), "decoder")
        ref = decoder(*feed.values())
    ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
    standard = run(emulate_bf16(onnx.load(str(bf16_dir / "decoder.onnx"))),
                   {k: v.numpy() for k, v in feed.items() if k in {i.name for i in model.graph.input}})[0]
    err_standard = np.abs(standard - ref).max() / np.abs(ref).max()
    (row,) = verify_variant(path, STAGE_SPECS["decoder"], decoder, tiny_cfg, TARGETS["bf16"], 1, 3, "bf16")
    assert row["ok"] and row["rel"] <= 2 * err_standard + 1e-3 and row["rel"] < 0.03, (row["rel"], err_standard)
