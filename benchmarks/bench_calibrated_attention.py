"""Benchmark the fused calibrated attention against the plain reference and SDPA (the floor).

At SAM 2's shapes (H=1, D=256, Nq=1024; 1-shot Nk = 2*1024 + 8, 5-shot layout Nk = 6*1024 + 24):
median and p90 latency, achieved TFLOP/s, peak extra memory and the max abs difference to the
fp32 reference, one row per (shots, dtype, batch, implementation). Writes JSON and Markdown.

    python benchmarks/bench_calibrated_attention.py --out out/bench --batch 1,2,4,8 --dtype fp16,bf16
    # CPU smoke run in Triton's interpreter (sets TRITON_INTERPRET=1 before triton is imported):
    python benchmarks/bench_calibrated_attention.py --device cpu --nq 64 --head-dim 32 --dtype fp32 \
        --batch 1,2 --warmup 1 --iters 3 --out out/bench-cpu

FLOPs count the attention proper, 4 * B * H * Nq * Nk * D (q k^T and p v), for every row, so
TFLOP/s compare like with like; the fused kernel also spends 2 * B * H * Nq * n_qry * D on its
min/max sweep, which is not counted. GPU times use CUDA events after a synchronise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/bench_calibrated_attention"), help="output folder")
    p.add_argument("--batch", default="1,2,4,8", help="comma-separated batch sizes")
    p.add_argument("--dtype", default="fp16,bf16", help=f"comma-separated, of {','.join(DTYPES)}")
    p.add_argument("--shots", default="1,5", help="comma-separated key layouts: 1 (2N+8 keys) and/or 5 (6N+24)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls per row (the first also autotunes)")
    p.add_argument("--iters", type=int, default=50, help="timed calls per row")
    p.add_argument("--nq", type=int, default=1024, help="query tokens = memory tokens per frame N")
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (Triton interpreter)")
    args = p.parse_args(argv)
    args.batch = [int(b) for b in args.batch.split(",")]
    args.shots = [int(s) for s in args.shots.split(",")]
    args.dtype = args.dtype.split(",")
    bad = [d for d in args.dtype if d not in DTYPES] + [s for s in args.shots if s not in (1, 5)]
    if bad:
        p.error(f"unsupported --dtype/--shots values: {bad}")
    return args


def _setup_backend(device: str) -> None:
    # The interpreter must be chosen before triton (and the kernel module) is imported.
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"


def _timer(device):
    """Returns time_call(fn) -> milliseconds, with CUDA events on GPU."""
    import torch

    if device.type == "cuda":
        def time_call(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end)
    else:
        def time_call(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return time_call


def _peak_extra_bytes(fn, device):
    """Peak memory allocated by one call beyond what was allocated before it (GPU only)."""
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure(fn, device, warmup: int, iters: int) -> dict:
    """Warm up, then time `iters` calls: median/p90 ms, first-call seconds, peak extra bytes."""
    time_call = _timer(device)
    t0 = time.perf_counter()
    time_call(fn)  # first call: compiles and autotunes the Triton kernel
    first_s = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        fn()
    times = sorted(time_call(fn) for _ in range(iters))
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return dict(median_ms=statistics.median(times), p90_ms=p90, first_call_s=first_s,
                peak_extra_bytes=_peak_extra_bytes(fn, device))


def make_case(batch, shots, nq, head_dim, heads, dtype, device, seed=0):
    """Random inputs for the 1-shot ([N | N | 8]) or 5-shot ([N | N | 4N + 24]) key layout."""
    import torch

    rest = 8 if shots == 1 else 4 * nq + 24
    n_k = 2 * nq + rest
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, nq, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, heads, n_k, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(batch, heads, n_k, head_dim, generator=gen).to(device, dtype)
    c = torch.rand(batch, heads, nq, generator=gen).to(device)
    return q, k, v, c, nq, nq


def bench_case(args, device, shots, dtype_name, batch) -> list[dict]:
    """One row per implementation for one (shots, dtype, batch)."""
    import torch
    import torch.nn.functional as F

    from fssam_deploy.kernels import calibrated_attention_reference
    from fssam_deploy.kernels.triton_calibrated_attention import calibrated_attention_triton

    dtype = getattr(torch, DTYPES[dtype_name])
    q, k, v, c, n_sup, n_qry = make_case(batch, shots, args.nq, args.head_dim, args.heads, dtype, device)
    exact = calibrated_attention_reference(q.float(), k.float(), v.float(), c, n_sup, n_qry)
    impls = {
        "fused_triton": lambda: calibrated_attention_triton(q, k, v, c, n_sup, n_qry),
        "reference_torch": lambda: calibrated_attention_reference(q, k, v, c, n_sup, n_qry),
        "sdpa_floor": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    flops = 4 * batch * args.heads * args.nq * k.shape[2] * args.head_dim
    rows = []
    for name, fn in impls.items():
        stats = measure(fn, device, args.warmup, args.iters)
        max_abs = None if name == "sdpa_floor" else (fn().float() - exact).abs().max().item()
        rows.append(dict(impl=name, shots=shots, dtype=dtype_name, batch=batch, n_q=args.nq, n_k=k.shape[2],
                         head_dim=args.head_dim, heads=args.heads, flops=flops,
                         tflops=flops / (stats["median_ms"] * 1e-3) / 1e12, max_abs_vs_fp32_ref=max_abs,
                         kernel_config=_kernel_config() if name == "fused_triton" else None, **stats))
    return rows


def _kernel_config():
    """The launch config the fused kernel used last: the autotuner's pick on GPU."""
    from fssam_deploy.kernels import triton_calibrated_attention as tk

    if tk.INTERPRETED:
        return str(tk.INTERPRETER_CONFIG)
    return str(getattr(tk._calibrated_attn_fwd_tuned, "best_config", None))


def environment(args, device) -> dict:
    """Device, versions and every setting the run applied."""
    import torch
    import triton

    from fssam_deploy.hostinfo import cpu_name
    from fssam_deploy.kernels import triton_calibrated_attention as tk

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return dict(
        device=str(device), device_name=name, torch=torch.__version__, triton=triton.__version__,
        cuda=torch.version.cuda, python=sys.version.split()[0], torch_threads=torch.get_num_threads(),
        triton_interpret=os.environ.get("TRITON_INTERPRET", ""), kernel_interpreted=tk.INTERPRETED,
        kernel_config="autotuned per row (see rows)" if not tk.INTERPRETED else vars(tk.INTERPRETER_CONFIG),
        cuda_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        settings=dict(batch=args.batch, dtype=args.dtype, shots=args.shots, warmup=args.warmup, iters=args.iters,
                      nq=args.nq, head_dim=args.head_dim, heads=args.heads, device=args.device, out=str(args.out)),
        flops_definition="4 * B * H * Nq * Nk * D",
    )


def _fmt(val, spec):
    return "-" if val is None else format(val, spec)


def to_markdown(env: dict, rows: list[dict]) -> str:
    """A Markdown report: environment, then one table row per measurement."""
    lines = [
        "# Calibrated attention benchmark", "",
        f"- device: {env['device']} ({env['device_name']}); torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda']}; TRITON_INTERPRET={env['triton_interpret'] or 'unset'}",
        f"- kernel config: {env['kernel_config']}; settings: `{json.dumps(env['settings'])}`",
        f"- TFLOP/s use {env['flops_definition']} for every implementation; memory = peak extra bytes of one call", "",
        "| shots | dtype | B | Nk | impl | median ms | p90 ms | TFLOP/s | peak extra MiB | max abs vs fp32 ref |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = None if r["peak_extra_bytes"] is None else r["peak_extra_bytes"] / 2**20
        lines.append(
            f"| {r['shots']} | {r['dtype']} | {r['batch']} | {r['n_k']} | {r['impl']} | {r['median_ms']:.3f} | "
            f"{r['p90_ms']:.3f} | {r['tflops']:.4g} | {_fmt(mem, '.1f')} | {_fmt(r['max_abs_vs_fp32_ref'], '.2e')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    """Run the benchmark; returns {"environment": ..., "rows": [...]} and writes it as JSON and Markdown."""
    args = parse_args(argv)
    _setup_backend(args.device)
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA GPU is visible; use --device cpu for the interpreter smoke run")
    env = environment(args, device)
    rows = []
    for shots in args.shots:
        for dtype_name in args.dtype:
            for batch in args.batch:
                rows.extend(bench_case(args, device, shots, dtype_name, batch))
    result = dict(environment=env, rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_calibrated_attention.json").write_text(json.dumps(result, indent=2))
    report = to_markdown(env, rows)
    (args.out / "bench_calibrated_attention.md").write_text(report)
    print(report)
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    main()
