"""Export every stage to ONNX (dynamo exporter), check, simplify, and write a manifest; atomically."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from fssam_deploy.atomic import atomic_dir
from fssam_deploy.errors import ConfigError
from fssam_deploy.manifest import MANIFEST, Manifest, weights_id
from fssam_deploy.model.checkpoint import make_weights
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.model.fssam import build_stages
from fssam_deploy.onnx.graphs import STANDARD_DOMAINS, check_graph, file_entries, save_graph  # noqa: F401
from fssam_deploy.stages import STAGE_SPECS, StageSpec, stage_module

ONNX_FORMAT = "fssam-onnx/1"
REEXPORT = "export the graphs again with `fssam export --out {out}`"
PRECISIONS = ("fp32", "fp16", "bf16")  # half graphs with fp32 islands, float32 inputs/outputs (onnx/fp16.py, bf16.py)


def export_stage(module: torch.nn.Module, spec: StageSpec, cfg: FSSAMConfig, path: Path, opset: int,
                 dynamic: bool, shots: int, precision: str = "fp32") -> dict:
    """Export one stage to `path`; returns its manifest entry (node counts before/after onnxslim, and for
    fp16 the op types kept fp32, `onnx.fp16.to_fp16`)."""
    import onnx
    import onnxslim

    example = export_raw(module, spec, cfg, path, opset, dynamic, shots)
    model = onnx.load(str(path))  # the exporter's external data, if any, is read in and replaced below
    nodes_before = len(model.graph.node)
    slim = onnxslim.slim(model)  # measured against onnx-simplifier: benchmarks/compare_simplifiers.py
    save_graph(slim, path)
    entry = {"file": path.name, "nodes": len(slim.graph.node), "nodes_before_onnxslim": nodes_before}
    if precision == "fp16":
        from fssam_deploy.onnx.fp16 import to_fp16

        entry.update(to_fp16(path, {k: v.numpy() for k, v in example.items()}))
    elif precision == "bf16":
        from fssam_deploy.onnx.bf16 import to_bf16

        entry.update(to_bf16(path))
    if precision != "fp32":
        entry["nodes"] = len(onnx.load(str(path), load_external_data=False).graph.node)
    check_graph(path)
    return {**entry, "inputs": io_entries(spec.inputs, cfg, dynamic, shots),
            "outputs": io_entries(spec.outputs, cfg, dynamic, shots), **file_entries(path)}


def export_raw(module: torch.nn.Module, spec: StageSpec, cfg: FSSAMConfig, path: Path, opset: int, dynamic: bool,
               shots: int) -> dict[str, torch.Tensor]:
    """The dynamo exporter's graph of one stage (not simplified) at `path`; returns the example inputs used."""
    example = spec.dummy_inputs(cfg, batch=2 if dynamic else 1, shots=shots)
    dyn = None
    if dynamic:
        batch = torch.export.Dim("batch", min=1, max=64)
        dyn = tuple({0: batch} for _ in spec.inputs)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), tuple(example.values()), str(path), dynamo=True, opset_version=opset,
                          input_names=spec.input_names, output_names=spec.output_names, dynamic_shapes=dyn,
                          optimize=True, verbose=False)
    return example


def io_entries(tensors, cfg, dynamic: bool, shots: int) -> list[dict]:
    out = []
    for t in tensors:
        shape = list(t.concrete(cfg, 1, shots))
        if dynamic:
            shape[0] = "batch"
        out.append({"name": t.name, "shape": shape, "dtype": "float32"})
    return out


def export_onnx(cfg: FSSAMConfig, out_dir: str | Path, checkpoint=None, seed: int = 0, opset: int = 18,
                batch: str = "1", precision: str = "fp32", stages: list[str] | None = None,
                progress: bool = True, force: bool = False) -> Path:
    """Write one ONNX graph per stage and `manifest.json` into `out_dir` (replaced atomically).

    precision "fp16" / "bf16": half graphs with fp32 islands (`onnx.fp16`, `onnx.bf16`); graph inputs and
    outputs stay float32. bf16 graphs are for TensorRT (ONNX Runtime's CPU provider runs them only emulated).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: choose from {list(PRECISIONS)}")
    if batch not in ("1", "dynamic"):
        raise ConfigError(f"batch must be '1' or 'dynamic', got {batch!r}")
    names = stages or list(STAGE_SPECS)
    unknown = sorted(set(names) - set(STAGE_SPECS))
    if unknown:
        raise ConfigError(f"unknown stages {unknown}; choose from {list(STAGE_SPECS)}")
    weights = make_weights(cfg, checkpoint, seed=seed, warn=False)
    module_set = build_stages(weights, attention_backend="torch")
    with atomic_dir(out_dir, force=force) as tmp:
        entries = _export_all(module_set, cfg, names, tmp, opset, batch == "dynamic", precision, progress)
        manifest = build_manifest(cfg, entries, opset, batch, precision, checkpoint, seed)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return Path(out_dir)


def _export_all(module_set, cfg, names, tmp: Path, opset: int, dynamic: bool, precision: str,
                progress: bool) -> dict:
    from rich.progress import Progress

    entries = {}
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("export", total=len(names))
        for name in names:
            bar.update(task, description=f"exporting {name}")
            entries[name] = export_stage(stage_module(module_set, name), STAGE_SPECS[name], cfg,
                                         tmp / f"{name}.onnx", opset, dynamic, cfg.shots, precision)
            bar.advance(task)
    return entries


def build_manifest(cfg, entries, opset, batch, precision, checkpoint, seed) -> dict:
    import onnx

    versions = {"torch": torch.__version__, "onnx": onnx.__version__}
    if precision in ("fp16", "bf16"):
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__  # its float16 converter placed the casts
    return {"format": ONNX_FORMAT, "config": cfg.to_dict(), "opset": opset, "batch": batch,
            "precision": precision, "shots": cfg.shots, "stages": entries,
            "weights": weights_id(checkpoint, seed),
            "versions": versions}


def read_manifest(engine_dir: str | Path, expect: FSSAMConfig | None = None) -> Manifest:
    """The folder's manifest, checked: an ONNX folder of ours, the expected config, every stage listed, every
    graph (and data file) present and unchanged (sha256)."""
    engine_dir = Path(engine_dir)
    m = Manifest.read(engine_dir, ONNX_FORMAT, REEXPORT.format(out=engine_dir), what="ONNX graph folder "
                      "(`fssam export`)")
    m.check_config(expect, "graphs")
    m.check_stages(STAGE_SPECS)
    for name in m["stages"]:
        m.artifact(name, "graph")
    return m
