"""`fssam bench`: per-stage and end-to-end latency, throughput, memory and parity per backend."""

from __future__ import annotations

import contextlib
import gc
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fssam_deploy.backends.registry import get, open_backend
from fssam_deploy.bench.flops import floor_environment, floor_fields
from fssam_deploy.bench.timing import Stats, Timer, current_rss_mb, peak_rss_mb, synchronize
from fssam_deploy.hostinfo import cpu_info, host_summary
from fssam_deploy.manifest import folder_format
from fssam_deploy.model.checkpoint import make_weights
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.parity import parity
from fssam_deploy.synthetic import episode_tensors


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
    gemm_floor: bool = True  # count the episode's FLOPs and time fp32 / bf16 matmuls (the moonshot's floor)
    extra: dict = field(default_factory=dict)


def measure_backend(backend, inputs, st: BenchSettings, reference: torch.Tensor | None,
                    floor: tuple[dict, dict[str, float]] | None = None) -> dict:
    """Episode latency, stage breakdown, cached-support latency, parity, memory; with `floor` (the episode's
    FLOPs per stage, the fp32 / bf16 matmul GFLOP/s), the GEMM floors and the episode's time over each."""
    q, sx, sy = (t.to(backend.device) for t in inputs)
    timer, episode, cached, stage_runs = Timer(backend.device), Stats(), Stats(), []

    def full():
        return backend.segment_query(q, backend.encode_supports(sx, sy))

    first = Stats()  # the first episode at this size: after loading (compilation, for torch.compile), or a recompile
    for i in range(st.warmup):
        with timer.measure(first) if i == 0 else contextlib.nullcontext():
            full()
    if backend.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(backend.device)
    for _ in range(st.iters):
        with timer.measure(episode):
            logits = full()
    overheads = []
    for _ in range(max(1, st.iters // 2)):
        wall = Stats()
        with backend.timing() as times, timer.measure(wall):
            full()
        stage_runs.append(dict(times))
        overheads.append(max(0.0, 1 - sum(times.values()) / wall.samples[0]))
    handle = backend.encode_supports(sx, sy)
    synchronize(backend.device)
    for _ in range(st.iters):
        with timer.measure(cached):
            backend.segment_query(q, handle)
    stages = stage_medians_ms(stage_runs)
    b = q.shape[0]
    row = {"backend": backend.name, "batch": b, "shots": sx.shape[1], "episode": episode.to_dict(),
           "cached_query": cached.to_dict(), "stages_ms": stages,
           "episodes_per_s": b / (episode.median_ms / 1e3), "cached_queries_per_s": b / (cached.median_ms / 1e3),
           "runtime_overhead_pct": 100.0 * statistics.median(overheads),
           "cached_speedup": episode.median_ms / cached.median_ms, "rss_peak_mb": peak_rss_mb(),
           "rss_now_mb": current_rss_mb(), "settings": getattr(backend, "settings", {})}
    if first.samples:
        row["first_episode_ms"] = first.median_ms  # one sample
    if backend.device.type == "cuda":
        row["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(backend.device) / 2**20
    if reference is not None:
        row.update(parity(logits, reference))
    if floor is not None:
        row.update(floor_fields(floor[0], episode.median_ms, floor[1]))
    return row


def stage_medians_ms(stage_runs: list[dict[str, float]]) -> dict[str, float]:
    """{stage: median ms} over the timed episodes' {stage: seconds}; of an even count, the mean of the middle two
    (with two episodes, indexing the sorted list at n // 2 reported the slower one)."""
    return {k: statistics.median(r.get(k, 0.0) for r in stage_runs) * 1e3 for k in stage_runs[0]}


def environment(st: BenchSettings) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "device": st.device}
    env["host"] = host_summary(torch.get_num_threads())  # CPU model and the ISA features that matter
    env["cpu"] = cpu_info()
    if torch.device(st.device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(st.device)
    for mod in ("onnxruntime", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return env


def run_bench(st: BenchSettings, out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Run every (backend, shots, batch) and return (and optionally write) the results.

    Every backend comes from the registry (`open_backend`, building what it lacks into a temporary folder) and
    runs the same weights; `--engine-dir` serves the first shot count."""
    from rich.progress import Progress

    if st.threads:
        torch.set_num_threads(st.threads)
    tagged = []  # ((shots index, batch index, backend index), row)
    floor_env = floor_environment(st.device, st.threads) if st.gemm_floor else {}
    rates = floor_env.get("matmul_gflops", {})
    cases = [(k, b) for k in st.shots for b in st.batches]
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("benchmark", total=len(cases) * len(st.backends))
        for ki, shots in enumerate(st.shots):
            cfg = st.cfg.replace(shots=shots)
            weights = make_weights(cfg, st.checkpoint, seed=st.seed, warn=False)
            engine_dir = st.engine_dir if shots == st.cfg.shots else None
            fmt = folder_format(engine_dir)  # the folder serves the backends that read its format
            ref_backend = open_backend("torch", cfg, device=st.device, weights=weights)
            try:
                cases_k = []
                for batch in st.batches:
                    inputs = episode_tensors(cfg, batch, shots, st.seed)
                    with ref_backend.counting_flops() as flops:  # the model's FLOPs, the same on every backend
                        ref = ref_backend.segment_query(inputs[0].to(st.device),
                                                        ref_backend.encode_supports(*(t.to(st.device)
                                                                                      for t in inputs[1:])))
                    cases_k.append((inputs, ref, (dict(flops), rates) if st.gemm_floor else None))
            finally:
                ref_backend.close()
            for j, name in enumerate(st.backends):  # one open at a time: they are measured one after another anyway
                be = open_backend(name, cfg, device=st.device, checkpoint=st.checkpoint, seed=st.seed,
                                  weights=weights, engine_dir=engine_dir if fmt and get(name).engine_format == fmt
                                  else None, threads=st.threads, build_missing=True)
                try:
                    for i, (inputs, ref, floor) in enumerate(cases_k):
                        bar.update(task, description=f"{name} K={shots} B={inputs[0].shape[0]}")
                        with torch.inference_mode():
                            tagged.append(((ki, i, j), measure_backend(be, inputs, st, ref, floor)))
                        bar.advance(task)
                finally:
                    be.close()
                    del be
                    gc.collect()  # a compiled stage holds itself (and its frozen weights) in a cycle
    rows = [row for _, row in sorted(tagged, key=lambda t: t[0])]  # shots, batch, backend, as the flags list them
    settings = {k: v for k, v in st.__dict__.items() if k != "cfg"}
    env = environment(st)
    env.update(floor_env)  # 2048^3, best of up to 10, this process's threads; the fastest library's, and each's
    result = {"config": st.cfg.to_dict(), "settings": settings, "environment": env, "rows": rows}
    if out_dir is not None:
        from fssam_deploy.bench.report import write_report

        write_report(result, Path(out_dir))
    return result
