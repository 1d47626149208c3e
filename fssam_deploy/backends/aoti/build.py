"""Compile every stage with AOTInductor into `<stage>.pt2` packages plus a manifest; atomically.

`torch.export.export` traces each stage (names and example inputs from `specs.STAGE_SPECS`), then
`torch._inductor.aoti_compile_and_package` turns it into native code for the local device: C++
on CPU, Triton/CUDA kernels on a GPU. Stages are built with `attention_backend="op"`, so the
decoder's calibrated attention is the `fssam::calibrated_attention` op; on CUDA its fused Triton
kernel is compiled into the decoder package, on CPU the op's reference body is.

Packages are tied to the torch build and the device that compiled them; `manifest.json` records
both (see `aoti_manifest`) and the runtime (`backends.aoti.runner`) refuses stale ones.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

from fssam_deploy.atomic import atomic_dir
from fssam_deploy.backends.aoti.autocast import AUTOCAST_DTYPES, AutocastStage
from fssam_deploy.backends.aoti.manifest import MANIFEST, build_manifest, device_info, weights_id
from fssam_deploy.backends.inductor import FAITHFUL
from fssam_deploy.errors import ConfigError
from fssam_deploy.model.checkpoint import file_sha256, make_weights
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.model.fssam import build_stages
from fssam_deploy.stages import STAGE_SPECS, StageSpec, stage_module

ATTENTION_BACKEND = "op"  # the decoder's attention as one custom op: the fused kernel on CUDA


def export_program(module: torch.nn.Module, spec: StageSpec, cfg: FSSAMConfig, device: torch.device,
                   batch: int, shots: int) -> torch.export.ExportedProgram:
    """torch.export of one stage at a static batch, on example inputs from its spec."""
    example = tuple(t.to(device) for t in spec.dummy_inputs(cfg, batch=batch, shots=shots).values())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # .to(device): stages own buffers built after the weights moved (e.g. RoPE tables)
        return torch.export.export(module.to(device).eval(), example, strict=False)


def compile_stage(module: torch.nn.Module, spec: StageSpec, cfg: FSSAMConfig, path: Path, device: torch.device,
                  batch: int, precision: str = "fp32") -> dict:
    """Export and AOT-compile one stage into the package `path`; returns its manifest entry.

    precision "bf16"/"fp16": the stage runs under autocast (float32 inputs and outputs).
    """
    if precision != "fp32":
        module = AutocastStage(module, precision, device.type)
    t0 = time.perf_counter()
    program = export_program(module, spec, cfg, device, batch, cfg.shots)
    t1 = time.perf_counter()
    metadata = {"fssam_stage": spec.name, "fssam_config": cfg.to_json()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                 inductor_configs={**FAITHFUL, "aot_inductor.metadata": metadata})
    t2 = time.perf_counter()
    shapes = spec.shapes(cfg, batch, cfg.shots)
    io = lambda tensors: [{"name": t.name, "shape": list(shapes[t.name]), "dtype": "float32"} for t in tensors]
    return {"file": path.name, "inputs": io(spec.inputs), "outputs": io(spec.outputs),
            "sha256": file_sha256(path), "export_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)}


def _check_request(names: list[str], device: torch.device, batch: int) -> None:
    unknown = sorted(set(names) - set(STAGE_SPECS))
    if unknown:
        raise ConfigError(f"unknown stages {unknown}; choose from {list(STAGE_SPECS)}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ConfigError(f"batch must be a positive int (packages have a static batch), got {batch!r}")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device}: AOTInductor packages are built for 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but torch sees no CUDA device; build with --device cpu")


def build_aoti(cfg: FSSAMConfig, out_dir: str | Path, checkpoint=None, seed: int = 0,
               device: str | torch.device = "cpu", stages: list[str] | None = None, batch: int = 1,
               precision: str = "fp32", progress: bool = True, force: bool = False) -> Path:
    """Compile the stages (all, or those named) into `<stage>.pt2` + `manifest.json` in `out_dir`.

    Weights come from `checkpoint` (an FSSAM checkpoint) or are drawn from `seed`. Packages are
    for the local `device` ("cpu" or "cuda[:i]") and a static `batch`. The folder is written in a
    temporary sibling and renamed into place: a failure leaves nothing behind, and an existing
    `out_dir` is replaced only on success. `precision` "bf16"/"fp16" compiles each stage under
    autocast (as the reference runs on GPUs). Returns `out_dir`.
    """
    if precision not in ("fp32", *AUTOCAST_DTYPES):
        raise ConfigError(f"precision {precision!r}: choose fp32, {', '.join(AUTOCAST_DTYPES)}")
    names = list(stages or STAGE_SPECS)
    device = torch.device(device)
    _check_request(names, device, batch)
    weights = make_weights(cfg, checkpoint, seed=seed, warn=False)
    module_set = build_stages(weights.to(device), attention_backend=ATTENTION_BACKEND)
    with atomic_dir(out_dir, force=force) as tmp:
        entries = _compile_all(module_set, cfg, names, tmp, device, batch, precision, progress)
        manifest = build_manifest(cfg, entries, device_info(device), batch, weights_id(checkpoint, seed))
        manifest["precision"] = precision
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return Path(out_dir)


def _compile_all(module_set, cfg, names, tmp: Path, device: torch.device, batch: int, precision: str,
                 progress: bool) -> dict:
    from rich.progress import Progress

    entries = {}
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("aoti", total=len(names))
        for name in names:
            bar.update(task, description=f"compiling {name} (AOTInductor, {device.type})")
            entries[name] = compile_stage(stage_module(module_set, name), STAGE_SPECS[name], cfg,
                                          tmp / f"{name}.pt2", device, batch, precision)
            bar.advance(task)
    return entries
