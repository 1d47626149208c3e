"""`fssam bench`: per-stage and end-to-end latency, throughput, memory and parity per backend."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..demo import synthetic_episode
from ..imageio import image_to_tensor, mask_to_tensor
from ..model import FSSAMConfig
from .backends import load_bench_weights, make_backend
from .timing import Stats, Timer, current_rss_mb, peak_rss_mb, synchronize


@dataclass
class BenchSettings:
    backends: list[str]
    batches: list[int]
    shots: list[int]
    cfg: FSSAMConfig
    warmup: int = 2
    iters: int = 5
    device: str = "cpu"
    checkpoint: str | None = None
    seed: int = 0
    engine_dir: str | None = None
    threads: int | None = None
    extra: dict = field(default_factory=dict)


def episode_inputs(cfg: FSSAMConfig, batch: int, shots: int, seed: int = 0):
    """B synthetic episodes (query, supports, masks) as model-size tensors."""
    qs, ss, ms = [], [], []
    for b in range(batch):
        q, _, sup, masks = synthetic_episode(cfg.image_size, shots, seed + b)
        qs.append(image_to_tensor(q, cfg.image_size))
        ss.append(torch.stack([image_to_tensor(s, cfg.image_size) for s in sup]))
        ms.append(torch.stack([mask_to_tensor(m, cfg.image_size) for m in masks]))
    return torch.stack(qs), torch.stack(ss), torch.stack(ms)


def parity(logits: torch.Tensor, ref: torch.Tensor) -> dict:
    a, b = logits.float().cpu() > 0, ref.float().cpu() > 0
    union = (a | b).sum().item()
    iou = 1.0 if union == 0 else (a & b).sum().item() / union
    return {"mask_iou": iou, "max_abs_logit_err": (logits.float().cpu() - ref.float().cpu()).abs().max().item()}


def measure_backend(backend, inputs, st: BenchSettings, reference: torch.Tensor | None) -> dict:
    """Episode latency, stage breakdown, cached-support latency, parity, memory."""
    q, sx, sy = (t.to(backend.device) for t in inputs)
    timer, episode, cached, stage_runs = Timer(backend.device), Stats(), Stats(), []

    def full():
        return backend.segment_query(q, backend.encode_supports(sx, sy))

    for _ in range(st.warmup):
        full()
    if backend.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(backend.device)
    for _ in range(st.iters):
        with timer.measure(episode):
            logits = full()
    overheads = []
    for _ in range(max(1, st.iters // 2)):
        wall = Stats()
        with backend.timing_stages() as times, timer.measure(wall):
            full()
        stage_runs.append(dict(times))
        overheads.append(max(0.0, 1 - sum(times.values()) / wall.samples[0]))
    handle = backend.encode_supports(sx, sy)
    synchronize(backend.device)
    for _ in range(st.iters):
        with timer.measure(cached):
            backend.segment_query(q, handle)
    stages = {k: sorted(r.get(k, 0.0) for r in stage_runs)[len(stage_runs) // 2] * 1e3 for k in stage_runs[0]}
    b = q.shape[0]
    row = {"backend": backend.name, "batch": b, "shots": sx.shape[1], "episode": episode.to_dict(),
           "cached_query": cached.to_dict(), "stages_ms": stages,
           "episodes_per_s": b / (episode.median_ms / 1e3), "cached_queries_per_s": b / (cached.median_ms / 1e3),
           "runtime_overhead_pct": 100.0 * sorted(overheads)[len(overheads) // 2],
           "cached_speedup": episode.median_ms / cached.median_ms, "rss_peak_mb": peak_rss_mb(),
           "rss_now_mb": current_rss_mb(), "settings": getattr(backend, "settings", {})}
    if backend.device.type == "cuda":
        row["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(backend.device) / 2**20
    if reference is not None:
        row.update(parity(logits, reference))
    return row


def environment(st: BenchSettings) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "device": st.device}
    if torch.device(st.device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(st.device)
    for mod in ("onnxruntime", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return env


def run_bench(st: BenchSettings, out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Run every (backend, shots, batch) and return (and optionally write) the results."""
    from rich.progress import Progress

    if st.threads:
        torch.set_num_threads(st.threads)
    rows = []
    cases = [(k, b) for k in st.shots for b in st.batches]
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("benchmark", total=len(cases) * len(st.backends))
        for shots in st.shots:
            cfg = st.cfg.replace(shots=shots)
            weights = load_bench_weights(cfg, st.checkpoint, st.seed)
            backends = [make_backend(n, cfg, weights, st.device, st.engine_dir if shots == st.cfg.shots else None,
                                     st.checkpoint, st.seed, st.threads) for n in st.backends]
            ref_backend = make_backend("torch", cfg, weights, st.device)
            for batch in st.batches:
                inputs = episode_inputs(cfg, batch, shots, st.seed)
                with torch.inference_mode():
                    ref = ref_backend.segment_query(inputs[0].to(st.device),
                                                    ref_backend.encode_supports(*(t.to(st.device) for t in inputs[1:])))
                for be in backends:
                    bar.update(task, description=f"{be.name} K={shots} B={batch}")
                    with torch.inference_mode():
                        rows.append(measure_backend(be, inputs, st, ref))
                    bar.advance(task)
    settings = {k: v for k, v in st.__dict__.items() if k != "cfg"}
    result = {"config": st.cfg.to_dict(), "settings": settings, "environment": environment(st), "rows": rows}
    if out_dir is not None:
        from .report import write_report

        write_report(result, Path(out_dir))
    return result
