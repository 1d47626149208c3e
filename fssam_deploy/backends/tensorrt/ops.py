"""Which ONNX operators TensorRT's ONNX parser takes: the list as data, and the checks of a graph against it.

`data/trt_onnx_ops.json` holds the operator table of onnx-tensorrt's `docs/operators.md` (source,
commit and date recorded in the file). `unsupported_trt_ops(path)` lists the operators of a graph
(subgraphs and local functions included) that are not on it; `initializer_violations(path)` lists
nodes that break the table's "`x` must be an initializer" restrictions; `type_violations(path)`
lists nodes whose data tensors have a type the table does not give for the op (e.g. a bf16 op the
parser takes only in fp32 / fp16).
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from pathlib import Path

from fssam_deploy.errors import EngineError

STANDARD_DOMAINS = ("", "ai.onnx")
_CONSTANT_RULE = re.compile(r"`(\w+)` must be (?:an initializer|a constant tensor)")


@functools.cache
def trt_op_table() -> dict:
    """The parsed `data/trt_onnx_ops.json` (keys: source, commit, opset_max, supported, unsupported, ...)."""
    return json.loads(resources.files(__package__).joinpath("data/trt_onnx_ops.json").read_text())


def supported_trt_ops() -> frozenset:
    """Names of the standard-domain operators the parser supports."""
    return frozenset(trt_op_table()["supported"])


def _graphs(graph):
    """`graph` and every subgraph held in node attributes (If / Loop / Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graphs(sub)


def _nodes(model):
    """Every node of the model: main graph, subgraphs and local function bodies."""
    for g in _graphs(model.graph):
        yield from g.node
    for fn in model.functions:
        yield from fn.node


def _load(onnx_path):
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise EngineError(f"{path}: ONNX graph not found")
    return onnx.load(str(path), load_external_data=False)


def unsupported_trt_ops(onnx_path, custom: frozenset = frozenset()) -> list[str]:
    """Sorted "domain::op" (just "op" in the standard domain) of operators TensorRT's parser does not take.

    `custom`: (domain, op_type) pairs to accept, e.g. a plugin node. A call of a local function
    counts as its body; an opset newer than the table's `opset_max` is reported as "opset:N".
    """
    model = _load(onnx_path)
    table, supported = trt_op_table(), supported_trt_ops()
    functions = {(f.domain, f.name) for f in model.functions}
    bad = set()
    for node in _nodes(model):
        key = (node.domain, node.op_type)
        if key in custom or key in functions:
            continue
        if node.domain in STANDARD_DOMAINS:
            if node.op_type not in supported:
                bad.add(node.op_type)
        else:
            bad.add(f"{node.domain}::{node.op_type}")
    for imp in model.opset_import:
        if imp.domain in STANDARD_DOMAINS and imp.version > table["opset_max"]:
            bad.add(f"opset:{imp.version}")
    return sorted(bad)


def initializer_violations(onnx_path) -> list[str]:
    """Nodes whose input must be an initializer (or Constant output) per the table, but is computed.

    Returns "node (op): input `name` is computed" strings; empty when the graph is fine.
    """
    import onnx

    model = _load(onnx_path)
    opset = next((i.version for i in model.opset_import if i.domain in STANDARD_DOMAINS), 18)
    rules = {op: _CONSTANT_RULE.findall(entry.get("restrictions", ""))
             for op, entry in trt_op_table()["supported"].items()}
    out = []
    for graph in _graphs(model.graph):
        constant = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                          for o in n.output}
        for node in graph.node:
            wanted = rules.get(node.op_type) if node.domain in STANDARD_DOMAINS else None
            if not wanted:
                continue
            names = [p.name for p in onnx.defs.get_schema(node.op_type, opset).inputs]
            for arg in wanted:
                idx = names.index(arg) if arg in names else None
                if idx is not None and idx < len(node.input) and node.input[idx] and node.input[idx] not in constant:
                    out.append(f"{node.name} ({node.op_type}): input `{arg}` is computed ({node.input[idx]!r})")
    return out


# onnx.TensorProto data types -> the table's type names
TRT_TYPE_NAMES = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 9: "BOOL", 2: "UINT8", 3: "INT8",
                  11: "FP64", 17: "FP8", 22: "INT4"}


def _data_inputs(node, opset: int) -> list[int]:
    """Indices of the node's data inputs: input 0 and the inputs typed like output 0 (not shapes, indices,
    axes or scales, which the table's type column does not cover)."""
    import onnx

    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return [0]
    formal = [p.type_str for p in schema.inputs]
    if not formal:
        return []
    out_type = schema.outputs[0].type_str if schema.outputs else None
    last = formal[-1]
    typed = [formal[i] if i < len(formal) else last for i in range(len(node.input))]  # variadic: the last repeats
    return [i for i, t in enumerate(typed) if node.input[i] and (i == 0 or t == out_type)]


def type_violations(onnx_path, custom: frozenset = frozenset()) -> list[str]:
    """Main-graph nodes whose data inputs (`_data_inputs`) have a type not in the op's row of the table, as
    "node (op): input `name` is BF16, the parser takes [...]"; types come from ONNX shape inference."""
    import onnx

    model = _load(onnx_path)
    opset = next((i.version for i in model.opset_import if i.domain in STANDARD_DOMAINS), 18)
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            types.update({o: a.t.data_type for a in n.attribute if a.HasField("t") for o in n.output})
    table = trt_op_table()["supported"]
    out = []
    for node in g.node:
        allowed = [t for t in table.get(node.op_type, {}).get("types", []) if t]
        if node.domain not in STANDARD_DOMAINS or (node.domain, node.op_type) in custom or not allowed:
            continue
        for i in _data_inputs(node, opset):
            got = TRT_TYPE_NAMES.get(types.get(node.input[i]))
            if got is not None and got not in allowed:
                out.append(f"{node.name} ({node.op_type}): input `{node.input[i]}` is {got}, the parser takes "
                           f"{allowed}")
    return out


def check_trt_ops(onnx_path, custom: frozenset = frozenset()) -> None:
    """Raise EngineError naming the file and the operators / nodes TensorRT's parser would refuse."""
    bad, computed = unsupported_trt_ops(onnx_path, custom), initializer_violations(onnx_path)
    typed = type_violations(onnx_path, custom)
    if bad or computed or typed:
        src = trt_op_table()["source"]
        raise EngineError(f"{onnx_path}: TensorRT's ONNX parser would refuse operators {bad} and nodes "
                          f"{computed + typed} (list: {src}); change the stage so the exporter emits supported "
                          "operators and types")
