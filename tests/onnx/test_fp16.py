"""fp16 graphs with fp32 islands (export/fp16.py): which nodes stay fp32, overflow, and real stages (tiny config)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fssam_deploy.errors import ConfigError
from fssam_deploy.model import build_stages, random_weights
from fssam_deploy.onnx.export import check_graph, export_onnx
from fssam_deploy.onnx.fp16 import FP16_SAFE_MAX, convert_fp16, fp32_islands, to_fp16
from fssam_deploy.stages import STAGE_SPECS, stage_module

FP16_STAGES = ["refinement", "decoder"]  # the calibrated attention, LayerNorms, min-max priors; cheap to export


def run(model_or_path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)


def run_fp16_faithfully(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnx's reference evaluator computes each node in its own dtype. ONNX Runtime's CPU provider runs
    fp16 nodes it has no fp16 kernel for in fp32 and drops the casts between them, hiding overflow."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, feeds)


def calibrated_attention_graph() -> onnx.ModelProto:
    """q (1, 4, 8) k, v (1, 6, 8): softmax(L + bias(minmax(L))) v, as the exporter writes the calibrated attention."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="transpose_k"),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk"),
        helper.make_node("Mul", ["s", "scale"], ["logits"], name="scale"),
        helper.make_node("ReduceMin", ["logits"], ["lo"], keepdims=1, name="lo"),
        helper.make_node("ReduceMax", ["logits"], ["hi"], keepdims=1, name="hi"),
        helper.make_node("Sub", ["logits", "lo"], ["num"], name="num"),
        helper.make_node("Sub", ["hi", "lo"], ["span"], name="span"),
        helper.make_node("Add", ["span", "eps"], ["den"], name="den"),
        helper.make_node("Div", ["num", "den"], ["a"], name="a"),
        helper.make_node("Add", ["logits", "a"], ["biased"], name="bias"),
        helper.make_node("Softmax", ["biased"], ["p"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["p", "v"], ["out"], name="pv"),
    ]
    inits = [numpy_helper.from_array(np.array(0.35, np.float32), "scale"),
             numpy_helper.from_array(np.array(1e-7, np.float32), "eps")]
    graph = helper.make_graph(nodes, "calibrated", [helper.make_tensor_value_info("q", f, [1, 4, 8]),
                                                    helper.make_tensor_value_info("k", f, [1, 6, 8]),
                                                    helper.make_tensor_value_info("v", f, [1, 6, 8])],
                              [helper.make_tensor_value_info("out", f, [1, 4, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_islands_keep_the_normalisation_and_softmax_not_the_matmuls():
    keep = fp32_islands(calibrated_attention_graph())
    assert {k for k, v in keep.items() if v == "op"} == {"lo", "hi", "softmax"}
    assert {k for k, v in keep.items() if v == "island"} == {"num", "span", "den", "a", "bias"}
    assert not {"qk", "pv", "scale", "transpose_k"} & set(keep)  # MatMuls (and what only feeds them) go fp16


def test_converted_graph_is_fp16_inside_float32_outside(tmp_path):
    model = calibrated_attention_graph()
    half = convert_fp16(model, fp32_islands(model))
    path = tmp_path / "half.onnx"
    onnx.save(half, path)
    check_graph(path)  # topologically sorted, types consistent, standard ops only
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in (*half.graph.input, *half.graph.output))
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(half).graph.value_info}
    node = {n.name: n for n in half.graph.node}
    assert types[node["qk"].output[0]] == TensorProto.FLOAT16 and types[node["softmax"].output[0]] == TensorProto.FLOAT
    # fp32 nodes read fp32 tensors: no fp16 round trip between the min-max and the softmax
    assert node["bias"].input[1] == node["a"].output[0] and types[node["a"].output[0]] == TensorProto.FLOAT
    g = np.random.default_rng(0)
    feeds = {n: g.standard_normal((1, 4 if n == "q" else 6, 8), dtype=np.float32) for n in "qkv"}
    ref = run(model, feeds)[0]
    np.testing.assert_allclose(run_fp16_faithfully(half, feeds)[0], ref, atol=5e-3, rtol=0)
    np.testing.assert_allclose(run(half, feeds)[0], ref, atol=5e-3, rtol=0)


def test_what_only_feeds_a_discrete_choice_stays_fp32():
    """tokens -> masks (fp16) and tokens -> IoU head -> ArgMax (fp32: a near-tie must not flip the chosen mask)."""
    f = TensorProto.FLOAT
    nodes = [helper.make_node("MatMul", ["x", "w"], ["tokens"], name="trunk"),
             helper.make_node("MatMul", ["tokens", "w"], ["masks"], name="masks"),
             helper.make_node("Gemm", ["tokens", "w"], ["h"], name="iou_fc"),
             helper.make_node("Sigmoid", ["h"], ["scores"], name="iou_sigmoid"),
             helper.make_node("ArgMax", ["scores"], ["best"], axis=-1, keepdims=0, name="pick")]
    graph = helper.make_graph(nodes, "decide", [helper.make_tensor_value_info("x", f, [2, 4])],
                              [helper.make_tensor_value_info("masks", f, [2, 4]),
                               helper.make_tensor_value_info("best", TensorProto.INT64, [2])],
                              [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")])
    keep = fp32_islands(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert keep == {"pick": "decision", "iou_sigmoid": "decision", "iou_fc": "decision"}  # not the shared trunk


def test_what_only_fp32_nodes_read_is_computed_in_fp32():
    """sigmoid(m) * 20 - 10 feeding only a kept node joins it; a MatMul feeding only a softmax stays half."""
    from fssam_deploy.onnx.fp16 import fp32_readers_only

    f = TensorProto.FLOAT
    nodes = [helper.make_node("Sigmoid", ["m"], ["s"], name="sig"),
             helper.make_node("Mul", ["s", "twenty"], ["s20"], name="scale"),
             helper.make_node("Add", ["s20", "minus10"], ["x"], name="bias"),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
             helper.make_node("MatMul", ["q", "q"], ["logits"], name="qk"),
             helper.make_node("Softmax", ["logits"], ["p"], name="softmax")]
    inits = [numpy_helper.from_array(np.array(20.0, np.float32), "twenty"),
             numpy_helper.from_array(np.array(-10.0, np.float32), "minus10"),
             numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")]
    graph = helper.make_graph(nodes, "readers", [helper.make_tensor_value_info("m", f, [1, 1, 4, 4]),
                                                 helper.make_tensor_value_info("q", f, [4, 4])],
                              [helper.make_tensor_value_info("y", f, [1, 1, 4, 4]),
                               helper.make_tensor_value_info("p", f, [4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    keep = fp32_readers_only(model, {"conv": "schema", "softmax": "op"})
    assert keep == {"conv": "schema", "softmax": "op", "bias": "feeds-fp32", "scale": "feeds-fp32",
                    "sig": "feeds-fp32"}


def overflow_graph() -> onnx.ModelProto:
    """x * 1e3 * 1e3 * 1e-6: the middle tensor (~1e7) is beyond fp16 (65504); the output is x again."""
    f = TensorProto.FLOAT
    nodes = [helper.make_node("Mul", ["x", "big"], ["y1"], name="up1"),
             helper.make_node("Mul", ["y1", "big"], ["y2"], name="up2"),
             helper.make_node("Mul", ["y2", "small"], ["y3"], name="down"),
             helper.make_node("Relu", ["y3"], ["out"], name="relu")]
    inits = [numpy_helper.from_array(np.array(1e3, np.float32), "big"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "small")]
    graph = helper.make_graph(nodes, "overflow", [helper.make_tensor_value_info("x", f, [2, 3])],
                              [helper.make_tensor_value_info("out", f, [2, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_measured_overflow_stays_fp32(tmp_path):
    x = {"x": np.arange(2, 14, 2, dtype=np.float32).reshape(2, 3)}
    naive = convert_fp16(overflow_graph(), {})  # no island here: all fp16
    with np.errstate(over="ignore"):
        assert np.isinf(run_fp16_faithfully(naive, x)[0]).all(), "the test graph must overflow in fp16"
    path = tmp_path / "overflow.onnx"
    onnx.save(overflow_graph(), path)
    info = to_fp16(path, x)
    assert set(info["fp32_out_of_range"]) == {"up1", "up2", "down"}  # 1.2e4 > 65504 / 8 already after up1
    assert min(info["fp32_out_of_range"].values()) > FP16_SAFE_MAX and info["fp16_nodes"] == 1
    check_graph(path)
    half = onnx.load(str(path))
    np.testing.assert_allclose(run_fp16_faithfully(half, x)[0], x["x"], rtol=1e-6)
    np.testing.assert_allclose(run(half, x)[0], x["x"], rtol=1e-6)


@pytest.fixture(scope="module")
def fp16_dir(tmp_path_factory, tiny_cfg):
    out = tmp_path_factory.mktemp("fp16") / "graphs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_onnx(tiny_cfg, out, seed=0, precision="fp16", stages=FP16_STAGES, progress=False)


def test_fp16_manifest_and_graphs(fp16_dir):
    import json

    m = json.loads((fp16_dir / "manifest.json").read_text())
    assert m["precision"] == "fp16" and "onnxruntime" in m["versions"]
    decoder = m["stages"]["decoder"]
    for op in ("LayerNormalization", "Softmax", "ReduceMin", "ReduceMax", "ReduceL2"):
        assert decoder["fp32_ops"].get(op, 0) > 0, op
    assert decoder["fp16_nodes"] > decoder["fp32_nodes"]
    for name in FP16_STAGES:
        entry = m["stages"][name]
        assert all(t["dtype"] == "float32" for t in (*entry["inputs"], *entry["outputs"]))
        path = fp16_dir / entry["file"]
        check_graph(path)
        g = onnx.load(str(path)).graph
        assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in (*g.input, *g.output))
        assert any(t.data_type == TensorProto.FLOAT16 for t in g.initializer), f"{name}: no fp16 weights"


def test_fp16_stages_match_torch(fp16_dir, tiny_cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stages = build_stages(random_weights(tiny_cfg, 0), attention_backend="torch")
    for name in FP16_STAGES:
        spec = STAGE_SPECS[name]
        feed = spec.dummy_inputs(tiny_cfg, 1, tiny_cfg.shots, seed=3)
        sess = ort.InferenceSession(str(fp16_dir / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        wanted = {i.name for i in sess.get_inputs()}
        got = sess.run(spec.output_names, {k: v.numpy() for k, v in feed.items() if k in wanted})
        with torch.inference_mode():
            ref = stage_module(stages, name)(*feed.values())
        for out, g, r in zip(spec.output_names, got, ref if isinstance(ref, tuple) else (ref,)):
            err = np.abs(g - r.numpy()).max() / r.abs().max().item()
            assert np.isfinite(g).all() and err <= 5e-3, (name, out, err)  # measured ~5e-4 (fp16: 2^-11 = 4.9e-4)


def test_fp16_plugin_variant_runs_true_fp16_next_to_its_kernel(tiny_cfg, tmp_path):
    """The decoder with one fssam::CalibratedAttention node per layer, in fp16 (ranges measured by onnx's
    reference evaluator running the node as the PyTorch reference), evaluated op by op in fp16."""
    from fssam_deploy.backends.tensorrt.ops import type_violations, unsupported_trt_ops
    from fssam_deploy.kernels import op  # noqa: F401  (registers torch.ops.fssam.calibrated_attention)
    from fssam_deploy.onnx.plugin_variant import CUSTOM_NODE, custom_nodes, export_plugin_stage, reference_op

    weights = random_weights(tiny_cfg, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = stage_module(build_stages(weights, attention_backend="op"), "decoder")
        path = tmp_path / "decoder.plugin.onnx"
        entry = export_plugin_stage(module, STAGE_SPECS["decoder"], tiny_cfg, path, 18, True, "fp16")
        plain = stage_module(build_stages(weights, attention_backend="torch"), "decoder")
    assert entry["precision"] == "fp16" and entry["custom_nodes"] == 4 and entry["fp16_nodes"] > entry["fp32_nodes"]
    model = onnx.load(str(path))
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    for node in custom_nodes(model):  # q, k, v, c and out in fp16: the kernel reads them so
        assert {types[t] for t in (*node.input, *node.output)} == {TensorProto.FLOAT16}
    custom = frozenset({CUSTOM_NODE})
    assert unsupported_trt_ops(path, custom) == [] and type_violations(path, custom) == []
    feed = STAGE_SPECS["decoder"].dummy_inputs(tiny_cfg, 1, tiny_cfg.shots, seed=3)
    from onnx.reference import ReferenceEvaluator

    names = {i.name for i in model.graph.input}
    got = ReferenceEvaluator(model, new_ops=[reference_op()]).run(None, {k: v.numpy() for k, v in feed.items()
                                                                          if k in names})[0]
    with torch.inference_mode():
        ref = plain(*feed.values())
    ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert np.isfinite(got).all() and err <= 5e-3, err  # measured 1.5e-3


def test_unknown_precision(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"precision 'int8': choose from \['fp32', 'fp16', 'bf16'\]"):
        export_onnx(tiny_cfg, tmp_path / "g", precision="int8")
    assert not list(tmp_path.iterdir())
