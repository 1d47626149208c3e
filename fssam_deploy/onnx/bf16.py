"""bf16 ONNX graphs (for strongly typed TensorRT bf16 engines) and their emulation on ONNX Runtime's CPU provider.

TensorRT 11 has no weak typing: a bf16 engine is parsed from a graph whose tensors are bf16. The
graphs here keep the fp16 export's fp32 islands (`onnx.fp16.fp32_islands`: LayerNorm, the
min-max normalisations, softmax and the glue between them) but no range islands: bf16 has fp32's
exponent range. Ops whose ONNX schema allows no bf16 at the graph's opset (at 18: Conv, ConvTranspose,
Resize, Einsum, Sin, Cos) stay fp32 too, and so does what only fp32 nodes read
(`onnx.fp16.fp32_readers_only`).
onnxruntime's float16 converter places the casts; then every float16 type becomes
bfloat16 and every converted weight is rounded (to nearest even) from its fp32 value, so the
converter's fp16 clamping never reaches a bf16 weight. Graph inputs and outputs stay float32.

ONNX Runtime's CPU provider has no bf16 kernels (MatMul, Add, ... are not implemented), so
`emulate_bf16` turns a bf16 graph into an fp32 graph that rounds every tensor the bf16 graph holds
in bf16 (Cast to bf16 and back: round to nearest even, as TensorRT stores bf16) while each op
computes in fp32 (as TensorRT's bf16 kernels accumulate). TensorRT fuses ops and skips some of
those roundings, so the emulation's error is an upper bound of the storage error. It is for
accuracy (`fssam verify`), not for speed.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from fssam_deploy.onnx.fp16 import _FLOAT, _FLOAT16, convert_fp16, fp32_islands, fp32_readers_only, name_nodes
from fssam_deploy.onnx.graphs import save_graph

_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16


def bf16_tensor(values: np.ndarray, name: str):
    """TensorProto of `values` rounded to bfloat16 (nearest even)."""
    import ml_dtypes
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(values, np.float32).astype(ml_dtypes.bfloat16), name)


def _retype_value_infos(graph, old: int, new: int) -> None:
    for v in (*graph.input, *graph.output, *graph.value_info):
        if v.type.tensor_type.elem_type == old:
            v.type.tensor_type.elem_type = new


def _cast_target(node):
    return next((a for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


def retype_bf16(half, fp32_model):
    """Rewrite the float16 tensors of `half` (onnxruntime's converter output of `fp32_model`) as bfloat16, in place;
    weights are rounded from their fp32 originals (same names), Constant values from their fp16 values."""
    from onnx import numpy_helper

    original = {t.name: t for t in fp32_model.graph.initializer}
    for i, t in enumerate(half.graph.initializer):
        if t.data_type != _FLOAT16:
            continue
        src = original.get(t.name)
        values = numpy_helper.to_array(src if src is not None and src.data_type == _FLOAT else t)
        half.graph.initializer[i].CopyFrom(bf16_tensor(values.astype(np.float32), t.name))
    for node in half.graph.node:
        to = _cast_target(node)
        if to is not None and to.i == _FLOAT16:
            to.i = _BFLOAT16
        for a in node.attribute:
            if a.HasField("t") and a.t.data_type == _FLOAT16:
                a.t.CopyFrom(bf16_tensor(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
    _retype_value_infos(half.graph, _FLOAT16, _BFLOAT16)
    return half


def no_bf16_schema(model) -> set[str]:
    """Names of the nodes whose ONNX schema (at the graph's opset) takes no bfloat16 float inputs, e.g.
    Conv or Einsum at opset 18: they stay fp32, or the graph would not be valid ONNX."""
    import onnx

    opset = {i.domain: i.version for i in model.opset_import}
    out = set()
    for node in model.graph.node:
        try:
            schema = onnx.defs.get_schema(node.op_type, opset.get(node.domain, 1), node.domain)
        except onnx.defs.SchemaError:
            continue
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
        floats = [allowed.get(p.type_str, set()) for p in schema.inputs
                  if "tensor(float)" in allowed.get(p.type_str, ())]
        if any("tensor(bfloat16)" not in a for a in floats):
            out.add(node.name)
    return out


def to_bf16(path: str | Path) -> dict:
    """Rewrite the fp32 graph at `path` as bf16 with fp32 islands; returns its manifest fields:
    fp32_ops ({op type: nodes kept fp32}), fp32_no_bf16_schema (op types ONNX allows no bf16 for),
    bf16_nodes, fp32_nodes."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    path = Path(path)
    model = onnx.load(str(path))
    name_nodes(model)
    keep = fp32_islands(model)
    keep.update({n.name: "op" for n in model.graph.node if n.op_type in DEFAULT_OP_BLOCK_LIST})
    keep.update(dict.fromkeys(no_bf16_schema(model), "schema"))
    keep = fp32_readers_only(model, keep)
    save_graph(retype_bf16(convert_fp16(model, keep), model), path)
    ops = {n.name: n.op_type for n in model.graph.node}
    return {"fp32_ops": dict(sorted(Counter(ops[k] for k in keep).items())),
            "fp32_no_bf16_schema": sorted({ops[k] for k, why in keep.items() if why == "schema"}),
            "bf16_nodes": len(ops) - len(keep),
            "fp32_nodes": len(keep)}


def emulate_bf16(model):
    """An fp32 copy of the bf16 graph `model` in which every tensor the graph holds in bf16 is rounded to bf16
    (Cast to bf16 and back) and every op computes in fp32; runs on ONNX Runtime's CPU provider."""
    import onnx
    from onnx import helper, numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
    typed = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.output)}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for i, t in enumerate(graph.initializer):
        if t.data_type == _BFLOAT16:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    nodes = []
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t") and a.t.data_type == _BFLOAT16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
        to = _cast_target(node)
        nodes.append(node)
        for j, name in enumerate(node.output):
            if not name or typed.get(name) != _BFLOAT16:
                continue
            stored = f"{name}__bf16"
            if to is not None and to.i == _BFLOAT16:  # the graph's own cast rounds; read it back as fp32
                node.output[j] = stored
                nodes.append(helper.make_node("Cast", [stored], [name], to=_FLOAT, name=f"{node.name}__fp32"))
            else:  # computed in fp32, then stored as bf16
                node.output[j] = f"{name}__fp32"
                nodes += [helper.make_node("Cast", [f"{name}__fp32"], [stored], to=_BFLOAT16,
                                           name=f"{node.name}__round"),
                          helper.make_node("Cast", [stored], [name], to=_FLOAT, name=f"{node.name}__fp32")]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # stale bf16 types; ONNX Runtime infers them again
    _retype_value_infos(graph, _BFLOAT16, _FLOAT)
    return out


def ort_model(path: str | Path, precision: str) -> bytes | str:
    """What ONNX Runtime loads for the graph at `path` of a folder of `precision`: the path, or for bf16 the
    serialized emulation (`emulate_bf16`)."""
    if precision != "bf16":
        return str(path)
    import onnx

    return emulate_bf16(onnx.load(str(path))).SerializeToString()
