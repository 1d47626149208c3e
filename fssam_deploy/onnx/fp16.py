"""fp16 ONNX graphs with fp32 islands, by onnxruntime's float16 converter; graph inputs and outputs stay float32.

Which nodes stay fp32, and why (each stage's manifest entry records the op types kept):
  - "op":     numerically sensitive op types wherever they are: LayerNormalization and the decomposed
              form's ReduceMean / Pow / Sqrt, the min-max normalisations' ReduceMin / ReduceMax, the
              prototypes' and cosines' ReduceSum / ReduceL2, Softmax;
  - "island": the cheap elementwise and data-movement ops between two such ops (the calibrated
              attention's (L - min) / (max - min + eps), bias and concat up to its softmax; the
              prior's cosine up to its min-max) and the first `TAIL` ones after one (the division
              by a norm, a min-max's division);
  - "decision": every node that only feeds a discrete choice (ArgMax / ArgMin / TopK: the mask decoder's
              pick of the best of its masks by predicted IoU, i.e. the whole IoU head): with random weights
              the scores nearly tie, and one rounding flips which mask the episode returns;
  - "range":  every node with a float input or output whose magnitude, measured in fp32 on the stage's
              dummy inputs with the weights being exported, exceeds FP16_SAFE_MAX (fp16 max / 8);
  - "feeds-fp32": every node whose float outputs only fp32 nodes read (`fp32_readers_only`): in half
              precision it would only round a value that is cast straight back (the memory encoder's
              sigmoid(mask) * 20 - 10 before its first conv, which bf16 graphs keep in fp32, rounded to
              bf16 flips its 4-channel LayerNorm).

HEAVY_OPS (MatMul, Gemm, Conv, ConvTranspose, Einsum) never join an island or feeds-fp32 (a decision's own
head aside): that is where half precision pays off.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from pathlib import Path

import numpy as np

from fssam_deploy.errors import EngineError
from fssam_deploy.onnx.graphs import save_graph

FP16_MAX = 65504.0
FP16_SAFE_MAX = FP16_MAX / 8  # headroom for inputs and weights other than the ones measured
TAIL = 2  # elementwise ops after a sensitive op that stay fp32 with it
SENSITIVE_OPS = frozenset({
    "LayerNormalization", "ReduceMean", "Pow", "Sqrt",  # normalisations, fused or decomposed
    "ReduceMin", "ReduceMax",  # min-max normalisations (calibrated attention, priors)
    "ReduceSum", "ReduceL2", "ReduceSumSquare",  # prototypes (masked sums), norms of cosines
    "Softmax", "LogSoftmax",
})
GLUE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Relu", "Clip", "Min", "Max", "Where", "Reciprocal",
    "Concat", "Slice", "Split", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand", "Transpose",
    "Gather", "GatherElements", "Identity", "Cast", "Resize",
})
DECISION_OPS = frozenset({"ArgMax", "ArgMin", "TopK"})
HEAVY_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"})  # where half precision pays off
_FLOAT = 1  # onnx.TensorProto.FLOAT
_FLOAT16 = 10  # onnx.TensorProto.FLOAT16


def name_nodes(model) -> None:
    """Give every node a unique name: the converter's block list is by node name."""
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def node_links(nodes) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """({node: the nodes that read its outputs}, {node: the nodes whose outputs it reads}), by node name."""
    producer = {o: n.name for n in nodes for o in n.output if o}
    consumers = defaultdict(list)
    for n in nodes:
        for i in n.input:
            if i in producer:
                consumers[producer[i]].append(n.name)
    return consumers, {n.name: [producer[i] for i in n.input if i in producer] for n in nodes}


def fp32_islands(model, tail: int = TAIL) -> dict[str, str]:
    """{node name: "op" | "island" | "decision"} for the sensitive ops, the glue between and right after them,
    and what only feeds a discrete choice."""
    nodes = list(model.graph.node)
    consumers, parents = node_links(nodes)
    op = {n.name: n.op_type for n in nodes}
    anchors = [n.name for n in nodes if n.op_type in SENSITIVE_OPS]

    def glue_reach(edges) -> dict[str, int]:  # glue node -> fewest glue hops from an anchor
        depth, todo = {}, deque((a, 0) for a in anchors)
        while todo:
            name, d = todo.popleft()
            for nxt in edges[name]:
                if op[nxt] in GLUE_OPS and nxt not in depth:
                    depth[nxt] = d + 1
                    todo.append((nxt, d + 1))
        return depth

    below, above = glue_reach(consumers), glue_reach(parents)
    keep = {a: "op" for a in anchors}
    for name, d in below.items():
        if name in above or d <= tail:
            keep[name] = "island"
    for name in decision_feeders(nodes, parents, consumers):
        keep.setdefault(name, "decision")
    return keep


def decision_feeders(nodes, parents: dict, consumers: dict) -> set[str]:
    """The discrete choices (DECISION_OPS) and the nodes all of whose consumers lead only to one, walking up."""
    chosen = {n.name for n in nodes if n.op_type in DECISION_OPS}
    todo = deque(chosen)
    while todo:
        for p in parents[todo.popleft()]:
            if p not in chosen and consumers[p] and all(c in chosen for c in consumers[p]):
                chosen.add(p)
                todo.append(p)
    return chosen


def fp32_readers_only(model, keep: dict[str, str]) -> dict[str, str]:
    """`keep` plus ("feeds-fp32") every node with a float output whose outputs only kept nodes read (not graph
    outputs, not HEAVY_OPS: a product feeding a softmax stays half), walking the topologically sorted graph
    backwards so chains of them close in one pass."""
    nodes = list(model.graph.node)
    readers = node_links(nodes)[0]
    floats = {v.name for v in float_tensors(model)}
    outputs = {o.name for o in model.graph.output}
    out = dict(keep)
    for n in reversed(nodes):
        if n.name in out or n.op_type in HEAVY_OPS or not floats.intersection(n.output) \
                or outputs.intersection(n.output):
            continue
        if readers[n.name] and all(r in out for r in readers[n.name]):
            out[n.name] = "feeds-fp32"
    return out


def float_tensors(model) -> list:
    """ValueInfos of every float32 tensor a node produces (shape inference fills in the types)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    infos = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.output)}
    produced = [o for n in model.graph.node for o in n.output if o]
    return [infos[o] for o in produced if o in infos and infos[o].type.tensor_type.elem_type == _FLOAT]


def measure_ranges(model, feeds: dict[str, np.ndarray], custom_ops: tuple = ()) -> dict[str, float]:
    """{tensor name: max |x|} of every float tensor of the fp32 graph on `feeds` (ONNX Runtime CPU).

    One run of a probe graph: the model plus ReduceMax(Abs(t)) of every float tensor t as extra scalar
    outputs, so no intermediate tensor is copied out and memory stays that of one inference.
    `custom_ops`: onnx.reference implementations of the graph's custom-domain nodes, which ONNX Runtime
    cannot run; with them the probe runs in onnx's reference evaluator instead.
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper

    graph_inputs = {i.name for i in model.graph.input}
    feeds = {k: v for k, v in feeds.items() if k in graph_inputs}  # the exporter drops unused inputs
    ranges = {k: float(np.abs(v).max()) for k, v in feeds.items()}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [v.name for v in float_tensors(model)]
    for i, t in enumerate(names):
        probe.graph.node.extend([helper.make_node("Abs", [t], [f"_probe_abs_{i}"]),
                                 helper.make_node("ReduceMax", [f"_probe_abs_{i}"], [f"_probe_max_{i}"], keepdims=0)])
        probe.graph.output.append(helper.make_tensor_value_info(f"_probe_max_{i}", _FLOAT, []))
    wanted = [f"_probe_max_{i}" for i in range(len(names))]
    if custom_ops:
        from onnx.reference import ReferenceEvaluator

        values = ReferenceEvaluator(probe, new_ops=list(custom_ops)).run(wanted, feeds)
    else:
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        values = ort.InferenceSession(probe.SerializeToString(), opts,
                                      providers=["CPUExecutionProvider"]).run(wanted, feeds)
    ranges.update({t: float(v) for t, v in zip(names, values)})
    return ranges


def out_of_range(model, ranges: dict[str, float], limit: float = FP16_SAFE_MAX) -> dict[str, float]:
    """{node name: largest |x| among its float inputs and outputs} for the nodes above `limit` (or not finite)."""
    found = {}
    for n in model.graph.node:
        seen = [ranges[t] for t in (*n.input, *n.output) if t in ranges]
        worst = max(seen, default=0.0)
        if not worst <= limit:  # NaN counts as out of range
            found[n.name] = worst
    return found


def drop_cast_round_trips(model) -> int:
    """Let fp32 nodes read fp32 tensors directly: Cast(to fp32) of Cast(to fp16) of a float32 tensor is
    a converter artefact between two blocked nodes, which would round (or overflow) the value; returns
    how many were removed."""
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.value_info)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    producer = {o: n for n in model.graph.node for o in n.output}

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    rename = {}
    for n in model.graph.node:
        inner = producer.get(n.input[0]) if n.op_type == "Cast" else None
        if cast_to(n) == _FLOAT and inner is not None and cast_to(inner) == _FLOAT16 \
                and types.get(inner.input[0]) == _FLOAT:
            rename[n.output[0]] = inner.input[0]
    outputs = {o.name for o in model.graph.output}
    rename = {k: v for k, v in rename.items() if k not in outputs}
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    return len(rename)


def tidy(model):
    """Remove dead nodes and sort topologically (the converter appends its Casts at the end)."""
    from onnxscript import ir

    graph = ir.serde.deserialize_model(model)
    ir.passes.common.RemoveUnusedNodesPass()(graph)
    ir.passes.common.TopologicalSortPass()(graph)
    return ir.serde.serialize_model(graph)


def convert_fp16(model, keep: dict[str, str]):
    """onnxruntime's converter with `keep` (node names) and its default op block list left fp32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=DEFAULT_OP_BLOCK_LIST,
                                    node_block_list=sorted(keep))
    drop_cast_round_trips(half)
    return tidy(half)


def to_fp16(path: str | Path, feeds: dict[str, np.ndarray], limit: float = FP16_SAFE_MAX,
            custom_ops: tuple = ()) -> dict:
    """Rewrite the fp32 graph at `path` as fp16 with fp32 islands; returns its manifest fields:
    fp32_ops ({op type: nodes kept fp32}), fp32_out_of_range ({node: measured max |x|}), fp16_nodes.
    `custom_ops`: see `measure_ranges`."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    path = Path(path)
    model = onnx.load(str(path))
    name_nodes(model)
    ranges = measure_ranges(model, feeds, custom_ops)
    bad_inputs = {k: v for k, v in ranges.items() if k in feeds and not v <= limit}
    if bad_inputs:
        raise EngineError(f"{path}: inputs {bad_inputs} exceed the fp16 range (|x| <= {limit:g}); export fp32")
    hot = out_of_range(model, ranges, limit)
    keep = {**fp32_islands(model), **dict.fromkeys(hot, "range")}
    keep.update({n.name: "op" for n in model.graph.node if n.op_type in DEFAULT_OP_BLOCK_LIST})
    keep = fp32_readers_only(model, keep)
    save_graph(convert_fp16(model, keep), path)
    ops = {n.name: n.op_type for n in model.graph.node}
    return {"fp32_ops": dict(sorted(Counter(ops[k] for k in keep).items())),
            "fp32_out_of_range": {k: round(v, 1) for k, v in sorted(hot.items())},
            "fp16_nodes": len(ops) - len(keep), "fp32_nodes": len(keep)}
