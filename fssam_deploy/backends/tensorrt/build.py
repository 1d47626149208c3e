"""Build one TensorRT engine per stage from the ONNX graphs of `fssam export`, with Polygraphy; atomically.

Per stage: `NetworkFromOnnxPath(graph, strongly_typed=...)` -> `CreateConfig(profiles=[one Profile
with every input's min/opt/max], load_timing_cache=..., memory_pool_limits=...)` ->
`EngineFromNetwork(..., save_timing_cache=...)` -> `SaveEngine`. Profiles come from the ONNX
manifest's input shapes and the episode batch range (`tensorrt_manifest.stage_profile`).

Precision: every engine is a strongly typed network, its types those of the graph it is parsed from:
fp16 / bf16 engines come from `fssam export --precision fp16 / bf16` graphs, on TensorRT 10 and 11
alike. TensorRT 11 has no weak typing (`BuilderFlag.FP16` is gone), and on TensorRT 10 weak typing
would let the builder run LayerNorm, the min-max normalisations and softmax in half precision,
which the half graphs keep in fp32. fp32 engines keep TF32 off (Polygraphy's default), for parity
with PyTorch fp32.

With `plugin=True` a stage that has a plugin variant (`onnx.plugin_variant`) is built from
it: its calibrated attention is the AOT plugin `fssam::CalibratedAttention`, registered here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fssam_deploy.atomic import atomic_dir
from fssam_deploy.backends.tensorrt.manifest import (
    ENGINE_MANIFEST,
    BuildSettings,
    build_manifest,
    check_timing_cache,
    current_platform,
    stage_profile,
    timing_cache_key,
    write_timing_cache_key,
)
from fssam_deploy.backends.tensorrt.ops import check_trt_ops
from fssam_deploy.errors import BackendUnavailableError, ConfigError, EngineError
from fssam_deploy.model.checkpoint import file_sha256
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.onnx.export import read_manifest
from fssam_deploy.stages import STAGE_SPECS

AOT_PLUGIN_MIN = (10, 9)  # tensorrt.plugin's aot_impl: engines that run the Triton kernel without Python


def trt_features() -> dict:
    """The installed TensorRT's version and whether it builds ahead-of-time Python plugins."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError("building TensorRT engines needs TensorRT: pip install tensorrt "
                                      "(and polygraphy, in fssam-deploy[onnx])") from exc
    return {"tensorrt": trt.__version__, "aot_plugins": version_tuple(trt.__version__) >= AOT_PLUGIN_MIN}


def version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "10.13.0.35"."""
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError as exc:
        raise EngineError(f"cannot read the TensorRT version {version!r}") from exc


def typing_plan(precision: str, graph_precision: str) -> dict:
    """{"strongly_typed": True} for engines of `precision` from graphs of `graph_precision`; they must agree."""
    if graph_precision == precision:
        return {"strongly_typed": True}
    raise EngineError(f"graphs exported in {graph_precision} cannot give {precision} engines: engines are strongly "
                      f"typed (TensorRT 11 has no weak typing, and on 10 it would run LayerNorm, the min-max "
                      f"normalisations and softmax in half precision); export {precision} graphs (`fssam export "
                      f"--precision {precision}`) or build --precision {graph_precision}")


def build_stage(onnx_path: Path, engine_path: Path, profile: dict, plan: dict, timing_cache: str | None,
                workspace_gib: float | None) -> None:
    """Parse, build and save one engine with Polygraphy's loaders."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    prof = Profile()
    for name, shapes in profile.items():
        prof.add(name, min=shapes["min"], opt=shapes["opt"], max=shapes["max"])
    pools = {trt.MemoryPoolType.WORKSPACE: int(workspace_gib * 2**30)} if workspace_gib else None
    config = CreateConfig(profiles=[prof], load_timing_cache=timing_cache, memory_pool_limits=pools)
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=plan["strongly_typed"])
    SaveEngine(EngineFromNetwork(network, config, save_timing_cache=timing_cache), str(engine_path))()


def _graph_for(name: str, onnx_dir: Path, manifest: dict, variants: dict | None) -> tuple[Path, dict, bool]:
    """(path, ONNX manifest entry, is plugin variant) of the graph a stage is built from, checked intact."""
    use_variant = variants is not None and name in variants["stages"]
    entry = variants["stages"][name] if use_variant else manifest["stages"][name]
    path = onnx_dir / entry["file"]
    if file_sha256(path) != entry["sha256"]:
        raise EngineError(f"{path}: graph content differs from its manifest's sha256 (modified after export); "
                          "export the graphs again")
    return path, entry, use_variant


def _plugin_setup(onnx_dir: Path, plugin: bool, features: dict) -> tuple[dict | None, str | None]:
    if not plugin:
        return None, None
    if not features["aot_plugins"]:
        raise BackendUnavailableError(f"TensorRT {features['tensorrt']} has no ahead-of-time Python plugins (they "
                                      f"need {'.'.join(map(str, AOT_PLUGIN_MIN))}+): upgrade TensorRT, or build the "
                                      "standard-op graphs with --no-plugin")
    from fssam_deploy.backends.tensorrt.plugin import kernel_source_sha256, register_plugin
    from fssam_deploy.onnx.plugin_variant import read_plugin_variants

    variants = read_plugin_variants(onnx_dir)
    register_plugin()
    return variants, kernel_source_sha256()


def _versions(plugin: bool) -> dict:
    import polygraphy
    import torch

    versions = {"polygraphy": polygraphy.__version__, "torch": torch.__version__}
    if plugin:
        import triton

        versions["triton"] = triton.__version__
    return versions


def build_tensorrt(onnx_dir: str | Path, out_dir: str | Path, precision: str = "fp32", batch: tuple = (1, 1, 1),
                   timing_cache: str | Path | None = None, workspace_gib: float | None = None, plugin: bool = True,
                   progress: bool = True, force: bool = False) -> Path:
    """Build `<stage>.engine` for every stage of STAGE_SPECS from `onnx_dir` into `out_dir`, plus `engines.json`.

    `batch` = (min, opt, max) episodes per call (graphs exported with a static batch take (1, 1, 1)).
    `timing_cache`: a file reused and extended across builds (refused when made for another GPU,
    TensorRT, precision or plugin kernel). `workspace_gib`: TensorRT's workspace limit (None: its
    default). `plugin`: build stages with the calibrated attention from their plugin variants.
    The folder is written beside `out_dir` and renamed into place: a failure leaves nothing behind.
    """
    settings = BuildSettings(str(Path(onnx_dir).resolve()), str(Path(out_dir).resolve()), precision, tuple(batch),
                             str(Path(timing_cache).resolve()) if timing_cache else None, workspace_gib, plugin)
    onnx_dir, out_dir = Path(settings.onnx_dir), Path(settings.out_dir)
    manifest = read_manifest(onnx_dir)
    cfg = FSSAMConfig.from_dict(manifest["config"])
    if manifest["batch"] != "dynamic" and settings.batch != (1, 1, 1):
        raise ConfigError(f"{onnx_dir}: graphs have a static batch (exported with --batch 1); batch {settings.batch} "
                          "needs graphs exported with --batch dynamic")
    plan = typing_plan(precision, manifest["precision"])
    features = trt_features()
    platform = current_platform()
    variants, kernel_sha = _plugin_setup(onnx_dir, plugin, features)
    key = timing_cache_key(platform, precision, kernel_sha)
    if settings.timing_cache:
        check_timing_cache(settings.timing_cache, key)
    with atomic_dir(out_dir, force=force) as tmp:
        stages = _build_all(onnx_dir, manifest, variants, cfg, settings, plan, tmp, progress)
        doc = build_manifest(cfg, settings, platform, stages, manifest, _versions(plugin), key)
        (tmp / ENGINE_MANIFEST).write_text(json.dumps(doc, indent=2))
    if settings.timing_cache:
        write_timing_cache_key(settings.timing_cache, key)
    return out_dir


def _build_all(onnx_dir, manifest, variants, cfg, settings: BuildSettings, plan, tmp: Path, progress: bool) -> dict:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fssam_deploy.onnx.plugin_variant import CUSTOM_NODE

    stages = {}
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("tensorrt", total=len(STAGE_SPECS))
        for name, spec in STAGE_SPECS.items():
            path, entry, is_variant = _graph_for(name, onnx_dir, manifest, variants)
            bar.update(task, description=f"building {name} ({settings.precision}{', plugin' if is_variant else ''})")
            check_trt_ops(path, frozenset({CUSTOM_NODE}) if is_variant else frozenset())
            profile = stage_profile(spec, entry["inputs"], settings.batch, cfg.shots)
            engine = tmp / f"{name}.engine"
            t0 = time.perf_counter()
            build_stage(path, engine, profile, plan, settings.timing_cache, settings.workspace_gib)
            stages[name] = {"file": engine.name, "sha256": file_sha256(engine), "onnx_file": path.name,
                            "onnx_sha256": entry["sha256"], "plugin": is_variant,
                            "custom_nodes": entry.get("custom_nodes", 0), "precision": settings.precision,
                            **plan, "profile": profile, "build_s": round(time.perf_counter() - t0, 1)}
            bar.advance(task)
    return stages
