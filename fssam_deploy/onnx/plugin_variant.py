"""ONNX graphs for TensorRT's plugin: the calibrated attention as ONE custom node per call.

Stages built with `attention_backend="op"` call `torch.ops.fssam.calibrated_attention`; the
dynamo exporter keeps it as one FX node, and `custom_translation_table` maps it to

    fssam::CalibratedAttention(q, k, v, c) -> out   {n_sup, n_qry, plugin_namespace="fssam", aot=1}

the form TensorRT's ONNX parser turns into the plugin `fssam::CalibratedAttention`
(`kernels.tensorrt_plugin`; op_type = plugin name, `plugin_namespace` = its namespace, `aot=1` =
its ahead-of-time kernel). The op is registered as an ONNX schema, so `onnx.checker` checks the
node too. ONNX Runtime cannot run these graphs: they are for TensorRT only, next to the standard
graphs of `export_onnx` in the same folder (`<stage>.plugin.onnx` + `plugin_variants.json`).

In a folder of fp16 / bf16 graphs the variants are converted the same way (`onnx.fp16`,
`onnx.bf16`): the custom node takes and gives half tensors (the kernel keeps the min-max
normalisation and the softmax in fp32 registers), the standard ops around it get the same fp32
islands; fp16 ranges are measured with onnx's reference evaluator running the node as the PyTorch
reference (`reference_op`).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from fssam_deploy.errors import ConfigError, EngineError
from fssam_deploy.manifest import weights_id
from fssam_deploy.model.checkpoint import file_sha256, make_weights
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.model.fssam import build_stages
from fssam_deploy.model.memory_attention import CalibratedMemoryAttention
from fssam_deploy.onnx.export import STANDARD_DOMAINS, io_entries, read_manifest
from fssam_deploy.onnx.graphs import save_graph
from fssam_deploy.stages import STAGE_SPECS, StageSpec, stage_module

PLUGIN_MANIFEST = "plugin_variants.json"  # beside the folder's manifest.json
PLUGIN_NAMESPACE = "fssam"
PLUGIN_NAME = "CalibratedAttention"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
#: The ONNX node's attributes the TensorRT plugin reads (in registration order), and those only the parser reads.
PLUGIN_ATTRS = ("n_sup", "n_qry")
PARSER_ATTRS = ("plugin_namespace", "aot")
CUSTOM_NODE = (PLUGIN_NAMESPACE, PLUGIN_NAME)
VARIANT_SUFFIX = ".plugin.onnx"
VARIANT_FORMAT = "fssam-onnx-plugin/1"
VARIANT_PRECISIONS = ("fp32", "fp16", "bf16")  # the folder's; int8 graphs are for ONNX Runtime
_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def register_onnx_schema() -> None:
    """Register `fssam::CalibratedAttention` (version 1) with onnx, once per process."""
    import onnx.defs as defs

    if defs.has(PLUGIN_NAME, PLUGIN_NAMESPACE):
        return
    schema, param = defs.OpSchema, defs.OpSchema.FormalParameter
    attr = lambda name, kind, doc: schema.Attribute(name, kind, doc)  # noqa: E731
    defs.register_schema(schema(
        PLUGIN_NAME, PLUGIN_NAMESPACE, 1,
        "Support-calibrated attention softmax(q k^T / sqrt(D) + bias) v (fssam_deploy.kernels): the TensorRT "
        "plugin fssam::CalibratedAttention.",
        inputs=[param("q", "T", "(B, H, Nq, D)"), param("k", "T", "(B, H, Nk, D)"), param("v", "T", "(B, H, Nk, D)"),
                param("c", "TC", "(B, H, n_qry) calibration weights")],
        outputs=[param("out", "T", "(B, H, Nq, D)")],
        type_constraints=[("T", _FLOATS, "q, k, v, out"), ("TC", _FLOATS, "c")],
        attributes=[attr("n_sup", schema.AttrType.INT, "support keys [0, n_sup)"),
                    attr("n_qry", schema.AttrType.INT, "calibrated keys [n_sup, n_sup + n_qry)"),
                    attr("plugin_namespace", schema.AttrType.STRING, "TensorRT plugin namespace"),
                    attr("aot", schema.AttrType.INT, "1: TensorRT uses the ahead-of-time kernel")]))


def _translation():
    """The onnxscript function that emits one custom node for `fssam::calibrated_attention`."""
    import onnxscript

    register_onnx_schema()
    opset = onnxscript.values.Opset(domain=PLUGIN_NAMESPACE, version=1)

    def calibrated_attention(q, k, v, c, n_sup: int, n_qry: int):
        return getattr(opset, PLUGIN_NAME)(q, k, v, c, n_sup=n_sup, n_qry=n_qry, plugin_namespace=PLUGIN_NAMESPACE,
                                           aot=1)

    return calibrated_attention


def plugin_stage_names(module_set) -> list[str]:
    """Stages (of STAGE_SPECS) whose module runs the calibrated attention, i.e. has plugin nodes."""
    return [name for name in STAGE_SPECS
            if any(isinstance(m, CalibratedMemoryAttention) for m in stage_module(module_set, name).modules())]


def expected_custom_nodes(module: torch.nn.Module) -> int:
    """One custom node per cross-attention call: a memory-attention layer calls it once."""
    return sum(len(m.ma.layers) for m in module.modules() if isinstance(m, CalibratedMemoryAttention))


def custom_nodes(model) -> list:
    """The graph's `fssam::CalibratedAttention` nodes (main graph)."""
    return [n for n in model.graph.node if (n.domain, n.op_type) == CUSTOM_NODE]


def check_variant_graph(path: str | Path, expected: int) -> None:
    """onnx.checker (full, the custom schema included), exactly `expected` custom nodes with the plugin's
    attributes, every other node in the standard domain, no local functions (no ATen fallbacks)."""
    import onnx

    register_onnx_schema()
    path = Path(path)
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    found = custom_nodes(model)
    if len(found) != expected:
        raise EngineError(f"{path}: {len(found)} {PLUGIN_ID} nodes, expected {expected} (one per memory-attention "
                          "layer); the stage was not built with attention_backend='op'?")
    odd = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                  if n.domain not in STANDARD_DOMAINS and (n.domain, n.op_type) != CUSTOM_NODE})
    if odd or model.functions:
        raise EngineError(f"{path}: non-standard nodes {odd} / local functions {[f.name for f in model.functions]}")
    for node in found:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        want = {"plugin_namespace": PLUGIN_NAMESPACE.encode(), "aot": 1}
        if any(attrs.get(k) != v for k, v in want.items()) or any(k not in attrs for k in PLUGIN_ATTRS):
            raise EngineError(f"{path}: node {node.name} has attributes {attrs}; expected {PLUGIN_ATTRS} and "
                              f"{PARSER_ATTRS} = {want}")


def reference_op():
    """onnx.reference implementation of `fssam::CalibratedAttention`: the PyTorch reference of the kernel."""
    import numpy as np
    from onnx.reference.op_run import OpRun

    from fssam_deploy.kernels.reference import calibrated_attention_reference

    def _run(self, q, k, v, c, n_sup=None, n_qry=None, plugin_namespace=None, aot=None):
        args = (torch.from_numpy(np.asarray(x, np.float32)) for x in (q, k, v, c))
        return (calibrated_attention_reference(*args, int(n_sup), int(n_qry)).numpy().astype(q.dtype),)

    return type(PLUGIN_NAME, (OpRun,), {"op_domain": PLUGIN_NAMESPACE, "_run": _run})


def convert_variant(path: Path, precision: str, feeds: dict) -> dict:
    """Rewrite the fp32 variant at `path` in `precision` like the folder's standard graphs; -> manifest fields."""
    if precision == "fp16":
        from fssam_deploy.onnx.fp16 import to_fp16

        return to_fp16(path, {k: v.numpy() for k, v in feeds.items()}, custom_ops=(reference_op(),))
    if precision == "bf16":
        from fssam_deploy.onnx.bf16 import to_bf16

        return to_bf16(path)
    return {}


def export_plugin_stage(module: torch.nn.Module, spec: StageSpec, cfg: FSSAMConfig, path: Path, opset: int,
                        dynamic: bool, precision: str = "fp32") -> dict:
    """Export one stage (built with attention_backend='op') with custom nodes, in `precision`; returns its
    manifest entry."""
    import onnx
    import onnxslim

    example = spec.dummy_inputs(cfg, batch=2 if dynamic else 1, shots=cfg.shots)
    dyn = tuple({0: torch.export.Dim("batch", min=1, max=64)} for _ in spec.inputs) if dynamic else None
    table = {torch.ops.fssam.calibrated_attention.default: _translation()}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), tuple(example.values()), str(path), dynamo=True, opset_version=opset,
                          input_names=spec.input_names, output_names=spec.output_names, dynamic_shapes=dyn,
                          custom_translation_table=table, optimize=True, verbose=False)
    save_graph(onnxslim.slim(onnx.load(str(path))), path)
    converted = convert_variant(path, precision, example)
    expected = expected_custom_nodes(module)
    check_variant_graph(path, expected)
    return {"file": path.name, "custom_nodes": expected, "precision": precision, **converted,
            "inputs": io_entries(spec.inputs, cfg, dynamic, cfg.shots),
            "outputs": io_entries(spec.outputs, cfg, dynamic, cfg.shots), "sha256": file_sha256(path)}


def export_plugin_variants(cfg: FSSAMConfig, onnx_dir: str | Path, checkpoint=None, seed: int = 0) -> Path:
    """Write `<stage>.plugin.onnx` for every stage with the calibrated attention, and `plugin_variants.json`,
    into the folder `export_onnx` wrote (same config, weights, opset and batch mode). Returns the manifest path.
    """
    onnx_dir = Path(onnx_dir)
    manifest = read_manifest(onnx_dir, expect=cfg)
    if manifest["precision"] not in VARIANT_PRECISIONS:
        raise ConfigError(f"{onnx_dir}: graphs of precision {manifest['precision']!r}; plugin variants are for "
                          f"TensorRT graphs {list(VARIANT_PRECISIONS)}: export those, or build with --no-plugin")
    wid = weights_id(checkpoint, seed)
    if manifest["weights"] != wid:
        raise ConfigError(f"{onnx_dir}: graphs exported from weights {manifest['weights']}, the plugin variants "
                          f"would be from {wid}; pass the same --checkpoint / --seed as `fssam export`")
    weights = make_weights(cfg, checkpoint, seed=seed, warn=False)
    from fssam_deploy.kernels import op as _op  # noqa: F401  (registers torch.ops.fssam.calibrated_attention)

    module_set = build_stages(weights, attention_backend="op")
    entries = {}
    for name in plugin_stage_names(module_set):
        path = onnx_dir / f"{name}{VARIANT_SUFFIX}"
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=onnx_dir) as work:  # the exporter's side files
            entries[name] = export_plugin_stage(stage_module(module_set, name), STAGE_SPECS[name], cfg,
                                                Path(work) / path.name, manifest["opset"],
                                                manifest["batch"] == "dynamic", manifest["precision"])
            os.replace(Path(work) / path.name, path)
    doc = {"format": VARIANT_FORMAT, "plugin": PLUGIN_ID, "config": cfg.to_dict(), "weights": wid,
           "opset": manifest["opset"], "batch": manifest["batch"], "precision": manifest["precision"],
           "stages": entries}
    out = onnx_dir / PLUGIN_MANIFEST
    with tempfile.NamedTemporaryFile("w", dir=onnx_dir, prefix=f".{PLUGIN_MANIFEST}.", delete=False) as f:
        json.dump(doc, f, indent=2)
    os.replace(f.name, out)
    return out


def read_plugin_variants(onnx_dir: str | Path) -> dict:
    """`plugin_variants.json` of an ONNX folder, checked against the folder's own manifest (same weights)."""
    onnx_dir = Path(onnx_dir)
    path = onnx_dir / PLUGIN_MANIFEST
    if not path.is_file():
        raise EngineError(f"{path}: no plugin variants in {onnx_dir}; export the graphs with "
                          "`fssam export ... --tensorrt-plugin` (or call export_plugin_variants(cfg, onnx_dir, "
                          "checkpoint, seed) with the graphs' checkpoint / seed), or build with --no-plugin")
    doc = json.loads(path.read_text())
    manifest = read_manifest(onnx_dir)
    ours = (doc.get("weights"), doc.get("config"), doc.get("precision", "fp32"))
    same = doc.get("format") == VARIANT_FORMAT and ours == (manifest["weights"], manifest["config"],
                                                            manifest["precision"])
    if not same:
        raise EngineError(f"{path}: plugin variants of other graphs (weights {ours[0]} vs {manifest['weights']}, "
                          f"precision {ours[2]} vs {manifest['precision']}, or another config); export them again")
    for name, entry in doc["stages"].items():
        if not (onnx_dir / entry["file"]).is_file():
            raise EngineError(f"{onnx_dir / entry['file']}: plugin variant of stage {name!r} is missing; export again")
    return doc
