"""`fssam verify`: any backend's artifact folder against PyTorch fp32, stage by stage and over a whole episode.

The folder's manifest format names its backend in the registry. ONNX graphs are compared stage by stage by
Polygraphy (and TensorRT plugin variants by onnx's reference evaluator); every other backend's runners are fed
the same generated inputs. The episode runs through the backend's own Episode. Fails loudly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fssam_deploy.backends import registry
from fssam_deploy.errors import AccuracyError, ConfigError, EngineError
from fssam_deploy.manifest import folder_manifest
from fssam_deploy.model.checkpoint import make_weights
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.model.fssam import build_stages
from fssam_deploy.model.pipeline import Pipeline
from fssam_deploy.onnx.export import MANIFEST, ONNX_FORMAT, read_manifest
from fssam_deploy.onnx.plugin_variant import PLUGIN_MANIFEST
from fssam_deploy.onnx.polygraphy_compare import compare_graph
from fssam_deploy.parity import StageTolerance
from fssam_deploy.stages import STAGE_SPECS, stage_module

STAGE_RTOL = 1e-4  # max abs error / output scale, fp32
EPISODE_ATOL = 1e-3  # max abs logit error, fp32
EPISODE_IOU = 0.999
FP16_EPISODE_IOU = 0.99  # fp16 graphs: stage errors are reported (and must be finite), the episode's mask decides
# bf16 keeps 8 bits of mantissa to fp16's 11. Measured (emulated, random weights): tiny config 0.985 (batch 2),
# paper config 0.9925; PyTorch's bf16 autocast on the same tiny episode gets 0.152 (its IoU head rounds, and the
# decoder picks another of its masks), and on the paper config on an H200 0.986-0.989
BF16_EPISODE_IOU = 0.98


@dataclass(frozen=True)
class Targets:
    """What a precision must meet. stage_rtol None: per-stage errors are reported, only NaN/inf fails."""

    stage_rtol: float | None
    episode_atol: float | None
    episode_iou: float

    def stage_ok(self, max_abs: float, polygraphy_passed: bool) -> bool:
        """fp32: Polygraphy's verdict (max abs err <= rtol x scale); fp16: the error is finite."""
        return math.isfinite(max_abs) and (self.stage_rtol is None or polygraphy_passed)

    def episode_ok(self, max_abs: float, iou: float) -> bool:
        logits_ok = self.episode_atol is None or max_abs <= self.episode_atol
        return math.isfinite(max_abs) and logits_ok and iou >= self.episode_iou

    def stage_tolerance(self, spec, output: str) -> StageTolerance | None:
        """The rule one stage output is held to at this precision (None: only NaN / inf fails)."""
        return None if self.stage_rtol is None else spec_tolerance(spec, output, self.stage_rtol)

    def describe_stage(self, tol: StageTolerance | None) -> str:
        return "finite" if tol is None else tol.describe()

    def describe_episode(self) -> str:
        logits = "" if self.episode_atol is None else f"logits <= {self.episode_atol:.0e}, "
        return f"{logits}IoU >= {self.episode_iou}"


INT8_EPISODE_IOU = 0.98  # the "fast" accuracy class
TARGETS = {"fp32": Targets(STAGE_RTOL, EPISODE_ATOL, EPISODE_IOU), "fp16": Targets(None, None, FP16_EPISODE_IOU),
           "bf16": Targets(None, None, BF16_EPISODE_IOU), "int8": Targets(None, None, INT8_EPISODE_IOU)}


@dataclass
class VerifyReport:
    precision: str = "fp32"
    rows: list[dict] = field(default_factory=list)
    episode: dict = field(default_factory=dict)
    backend: str = "onnxruntime"

    @property
    def passed(self) -> bool:
        return all(r["ok"] for r in self.rows) and self.episode.get("ok", False)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "backend": self.backend, "precision": self.precision, "stages": self.rows,
                "episode": self.episode}

    def table(self) -> str:
        emulated = " (bf16 graphs run as their fp32 emulation with bf16 storage rounding: ms are not bf16's)" \
            if self.precision == "bf16" and self.backend == "onnxruntime" else ""
        how = "Polygraphy" if self.backend == "onnxruntime" else f"the {self.backend} runners"
        lines = [f"backend {self.backend}, precision {self.precision}{emulated}; stages: errors and ms from {how} (max "
                 f"rel err is elementwise; one timed run after a warm-up); episode: the {self.backend} episode, median",
                 "| stage | output | max abs err | scale | err / scale | max rel err | target | torch ms | "
                 f"{self.backend} ms | ok |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['stage']} | {r['output']} | {r['max_abs']:.2e} | {r['scale']:.3g} | {r['rel']:.2e} | "
                         f"{r['max_rel']:.2e} | {r['target']} | {r['torch_ms']:.1f} | {r['ort_ms']:.1f} | "
                         f"{'yes' if r['ok'] else 'NO'}{_share_note(r)} |")
        e = self.episode
        if e:
            rel = e["max_abs"] / e["scale"]
            lines.append(f"| episode | logits | {e['max_abs']:.2e} | {e['scale']:.3g} | {rel:.2e} | - | "
                         f"{e['target']} | {e['torch_ms']:.1f} | {e['ort_ms']:.1f} | {'yes' if e['ok'] else 'NO'} "
                         f"(mask IoU {e['iou']:.5f}) |")
        return "\n".join(lines)


def _share_note(row: dict) -> str:
    """The share of a bf16-rounded output's elements beyond rtol x scale (None for other outputs)."""
    off = row.get("off")
    return "" if off is None else f" ({off:.2%} of elements off)"


def weights_for(manifest, checkpoint=None):
    """The config and weights a folder was made from: its manifest's `weights` id, `checkpoint` when it names one."""
    cfg = FSSAMConfig.from_dict(manifest["config"])
    src = manifest.get("weights", "random:0")
    if checkpoint is None and not src.startswith("random:"):
        raise EngineError(f"the folder was made from a checkpoint ({src}); pass the same --checkpoint to verify")
    seed = int(src.split(":")[1]) if src.startswith("random:") else 0
    return cfg, make_weights(cfg, checkpoint, seed=seed, warn=False)


def _timed(fn, reps: int = 3):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, sorted(times)[len(times) // 2] * 1e3


def verify(engine_dir: str | Path, checkpoint=None, batch: int = 1, seed: int = 0, reps: int = 3,
           raise_on_fail: bool = False, device: str = "cpu", backend: str | None = None) -> VerifyReport:
    """Per-stage (generated inputs) and end-to-end (synthetic episode) comparison of the folder's backend with
    PyTorch fp32, against the targets of the precision it runs in (`TARGETS`).

    `backend`: the registry backend that runs the folder (default: the reader of the folder's format whose own
    precision is the folder's, e.g. `openvino-int8` for int8 IR); one that computes in less than the folder holds
    (`openvino-bf16` over fp32 IR) is held to its own precision's targets."""
    engine_dir = Path(engine_dir)
    data = folder_manifest(engine_dir)  # read once: its format, precision and config choose and shape the run
    fmt = data["format"] if data else None
    backends = registry.by_engine_format(fmt) if fmt else []
    if not backends:
        raise EngineError(f"{engine_dir}: not an artifact folder of a known backend (manifest format {fmt!r}); "
                          "verify takes folders written by `fssam export` or `fssam build`")
    chosen = pick_reader(engine_dir, backends, backend, data.get("precision"))
    if fmt == ONNX_FORMAT:  # graph by graph through Polygraphy, whichever ONNX Runtime backend was named
        return verify_onnx(engine_dir, checkpoint, batch, seed, reps, raise_on_fail)
    episode = registry.open_backend(chosen.name, _folder_config(engine_dir, data, chosen), device=device,
                                    engine_dir=engine_dir)
    try:
        precision = episode.manifest.precision if chosen.precision == "fp32" else chosen.precision
        targets = _targets(engine_dir, precision)
        cfg, weights = weights_for(episode.manifest, checkpoint)
        stages = build_stages(weights, attention_backend="torch")
        report = VerifyReport(precision, backend=chosen.name)
        for name, spec in STAGE_SPECS.items():
            report.rows += verify_runner(episode.runners[name], spec, stage_module(stages, name), cfg, targets, batch,
                                         seed)
        report.episode = verify_episode(episode, cfg, weights, targets, batch, seed, reps)
    finally:
        episode.close()
    if raise_on_fail and not report.passed:
        raise AccuracyError(f"{engine_dir}: {chosen.name} differs from PyTorch beyond tolerance:\n{report.table()}")
    return report


def pick_reader(engine_dir: Path, backends: list, name: str | None, folder_precision: str | None):
    """The backend that verifies the folder: `name` if it reads the folder's format and precision, else the reader
    whose own precision is the folder's (then any reader of it)."""
    readers = [b for b in backends if folder_precision is None or b.loads_precision(folder_precision)] or backends
    if name is not None:
        b = registry.get(name)  # an unknown name: the registry's error lists the backends
        if b not in readers:
            what = f"a {backends[0].engine_format} folder" + (f" of precision {folder_precision}"
                                                               if folder_precision else "")
            raise ConfigError(f"--backend {name}: does not run {engine_dir} ({what}); the backends that do: "
                              f"{', '.join(r.name for r in readers)}")
        return b
    return next((b for b in readers if b.precision == folder_precision), readers[0])


def _folder_config(engine_dir: Path, data: dict, backend) -> FSSAMConfig:
    """The config in the folder's manifest (`manifest.folder_manifest`), or an error with the build command."""
    try:
        return FSSAMConfig.from_dict(data["config"])
    except Exception as exc:  # the backend's own reader gives the precise error below
        raise EngineError(f"{engine_dir}: no valid config in the manifest ({exc}); rebuild the folder with "
                          f"`{backend.engine_source}`") from None


def _targets(engine_dir: Path, precision: str) -> Targets:
    if precision not in TARGETS:
        raise EngineError(f"{engine_dir / MANIFEST}: precision {precision!r} has no verify targets; "
                          f"known: {list(TARGETS)}")
    return TARGETS[precision]


def verify_onnx(engine_dir: Path, checkpoint=None, batch: int = 1, seed: int = 0, reps: int = 3,
                raise_on_fail: bool = False) -> VerifyReport:
    """ONNX graphs: Polygraphy per stage, plugin variants by onnx's reference evaluator, our ONNX Runtime episode."""
    from fssam_deploy.backends.onnxruntime import onnx_episode

    manifest = read_manifest(engine_dir)
    precision = manifest.precision
    targets = _targets(engine_dir, precision)
    cfg, weights = weights_for(manifest, checkpoint)
    stages = build_stages(weights, attention_backend="torch")
    report = VerifyReport(precision)
    for name, spec in STAGE_SPECS.items():
        report.rows += verify_stage(engine_dir / manifest["stages"][name]["file"], spec, stage_module(stages, name),
                                    cfg, targets, batch, seed, reps, precision)
    if (engine_dir / PLUGIN_MANIFEST).is_file():  # `fssam export --tensorrt-plugin`: the graphs TensorRT will get
        from fssam_deploy.onnx.plugin_variant import read_plugin_variants

        for name, entry in read_plugin_variants(engine_dir)["stages"].items():
            report.rows += verify_variant(engine_dir / entry["file"], STAGE_SPECS[name], stage_module(stages, name),
                                          cfg, targets, batch, seed, precision)
    with onnx_episode(engine_dir, emulate_bf16=True) as episode:
        report.episode = verify_episode(episode, cfg, weights, targets, batch, seed, reps)
    if raise_on_fail and not report.passed:
        raise AccuracyError(f"{engine_dir}: ONNX Runtime differs from PyTorch beyond tolerance:\n{report.table()}")
    return report


def verify_runner(runner, spec, module, cfg, targets: Targets, batch: int, seed: int) -> list[dict]:
    """One row per output: a backend's runner against the PyTorch stage on the spec's generated inputs."""
    feed = spec.dummy_inputs(cfg, batch, cfg.shots, seed)
    with torch.inference_mode():
        ref, t_ms = _timed(lambda: module(*feed.values()), 1)
        got, b_ms = _timed(lambda: runner.infer({k: v.to(runner_device(runner)) for k, v in feed.items()}), 1)
    ref = dict(zip(spec.output_names, ref if isinstance(ref, tuple) else (ref,)))
    return [output_row(spec.name, spec, out, got[out], want, targets, t_ms, b_ms) for out, want in ref.items()]


def output_row(label: str, spec, out: str, got, want, targets: Targets, t_ms: float, b_ms: float) -> dict:
    """The report row of one output (torch tensors or numpy arrays) against PyTorch's, by its spec's tolerance."""
    got, want = torch.as_tensor(got).float().cpu(), torch.as_tensor(want).float().cpu()
    tol = targets.stage_tolerance(spec, out)
    c = (tol or StageTolerance(math.inf)).check(got, want)
    max_rel = ((got - want).abs() / want.abs().clamp_min(1e-12)).max().item() if got.shape == want.shape else math.nan
    return {"stage": label, "output": out, "max_abs": c["max_abs"], "max_rel": max_rel, "scale": c["scale"],
            "rel": c["max_abs"] / c["scale"], "off": c["off"], "target": targets.describe_stage(tol),
            "ok": targets.stage_ok(c["max_abs"], tol is None or c["ok"]), "torch_ms": t_ms, "ort_ms": b_ms}


def runner_device(runner) -> torch.device:
    return torch.device(getattr(runner, "device", "cpu"))


def verify_stage(path: Path, spec, module, cfg, targets: Targets, batch: int, seed: int, reps: int,
                 precision: str = "fp32") -> list[dict]:
    """One row per output: Polygraphy's errors of the graph at `path` against the PyTorch stage."""
    from fssam_deploy.onnx.bf16 import ort_model

    feed = spec.dummy_inputs(cfg, batch, cfg.shots, seed)
    with torch.inference_mode():
        ref, t_ms = _timed(lambda: module(*feed.values()), reps)
    ref = dict(zip(spec.output_names, ref if isinstance(ref, tuple) else (ref,)))
    scales = {k: max(v.abs().max().item(), 1e-6) for k, v in ref.items()}
    tols = {k: targets.stage_tolerance(spec, k) for k in ref}
    atol = {k: math.inf if tols[k] is None else tols[k].max_rtol * scales[k] for k in ref}
    share_atol = {k: t.rtol * scales[k] for k, t in tols.items() if t is not None and t.bf16_rounded}
    errors, seconds = compare_graph(path, {k: v.numpy() for k, v in feed.items()},
                                    {k: v.numpy() for k, v in ref.items()}, atol, model=ort_model(path, precision),
                                    share_atol=share_atol)
    rows = []
    for out, e in errors.items():
        tol = tols[out]
        ok = targets.stage_ok(e.max_abs, e.passed and (tol is None or tol.ok(e.max_abs, scales[out], e.off)))
        rows.append({"stage": spec.name, "output": out, "max_abs": e.max_abs, "max_rel": e.max_rel,
                     "scale": scales[out], "rel": e.max_abs / scales[out], "off": e.off,
                     "target": targets.describe_stage(tol), "ok": ok, "torch_ms": t_ms, "ort_ms": seconds * 1e3})
    return rows


def verify_variant(path: Path, spec, module, cfg, targets: Targets, batch: int, seed: int,
                   precision: str = "fp32") -> list[dict]:
    """Rows for a TensorRT plugin variant (`<stage>.plugin.onnx`), which ONNX Runtime cannot run: onnx's reference
    evaluator runs it, its custom nodes as the PyTorch reference of the fused kernel (`reference_op`) and every
    other op in the graph's own type (fp16 for real, bf16 emulated)."""
    import numpy as np
    import onnx
    from onnx.reference import ReferenceEvaluator

    from fssam_deploy.onnx.bf16 import emulate_bf16
    from fssam_deploy.onnx.plugin_variant import reference_op, register_onnx_schema
    from fssam_deploy.onnx.polygraphy_compare import graph_inputs, split

    register_onnx_schema()
    model = onnx.load(str(path))
    if precision == "bf16":
        model = emulate_bf16(model)
    evaluator = ReferenceEvaluator(model, new_ops=[reference_op()])
    feed = spec.dummy_inputs(cfg, batch, cfg.shots, seed)
    with torch.inference_mode():
        ref, t_ms = _timed(lambda: module(*feed.values()), 1)
    ref = dict(zip(spec.output_names, ref if isinstance(ref, tuple) else (ref,)))
    names, step = graph_inputs(path)
    t0 = time.perf_counter()
    parts = [evaluator.run(spec.output_names, f) for f in split({k: feed[k].numpy() for k in names}, step)]
    ms = (time.perf_counter() - t0) * 1e3
    label = f"{spec.name} (TensorRT plugin variant, onnx reference evaluator)"
    return [output_row(label, spec, out, np.concatenate([p[i] for p in parts]), ref[out], targets, t_ms, ms)
            for i, out in enumerate(spec.output_names)]


def verify_episode(episode, cfg, weights, targets: Targets, batch: int, seed: int, reps: int) -> dict:
    """A synthetic episode through the backend's episode (stage to stage on its device) and the PyTorch Pipeline."""
    from fssam_deploy.parity import mask_iou
    from fssam_deploy.synthetic import episode_tensors

    q, sx, sy = episode_tensors(cfg, batch, cfg.shots, seed)
    pipe = Pipeline(weights, attention_backend="torch")
    ref, t_ms = _timed(lambda: pipe.segment(q, sx, sy), reps)
    got, o_ms = _timed(lambda: episode.segment(q, sx, sy), reps)
    got = got.cpu()
    iou, err = mask_iou(got, ref), (got - ref).abs().max().item()
    return {"max_abs": err, "scale": max(ref.abs().max().item(), 1e-6), "iou": iou, "torch_ms": t_ms, "ort_ms": o_ms,
            "target": targets.describe_episode(), "ok": targets.episode_ok(err, iou)}


def spec_tolerance(spec, output: str, rtol: float = STAGE_RTOL) -> StageTolerance:
    """The tolerance of one output of a stage: rtol (fp32: STAGE_RTOL) x scale, with one bf16 step allowed in a few
    elements of an output its spec marks bf16-rounded (the memory)."""
    return StageTolerance(rtol, spec.output(output).bf16_rounded)
