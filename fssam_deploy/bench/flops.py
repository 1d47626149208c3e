"""The GEMM floor of an episode: its FLOPs per stage (counted on the PyTorch stage modules) over the matmul
rate measured on this machine, so a backend's time can be read against what the hardware could do.

The rate is the fastest of the matmul libraries a backend here runs on (`floor_environment`): torch's (MKL for fp32,
oneDNN for bf16 on the CPU) and, on the CPU where installed, OpenVINO's (oneDNN). One library is not the
machine: on a 2-core AVX-512 EPYC torch's fp32 matmul ran at 162-183 GFLOP/s and OpenVINO's at 314-368.

FLOPs are those of `torch.utils.flop_counter` (matmuls, convolutions, attention), the work a matrix unit
does; element-wise work is not counted. PyTorch has no formula for the CPU's fused attention op, so one is
registered here (the same count as its GPU attention ops).
"""

from __future__ import annotations

import time

import torch
from torch.utils import flop_counter

_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _register_cpu_attention() -> None:
    if _CPU_SDPA in flop_counter.flop_registry or _CPU_SDPA.default in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(_CPU_SDPA, get_raw=True)
    def _cpu_sdpa_flop(query, key, value, *args, out_val=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)


def flop_counter_mode() -> flop_counter.FlopCounterMode:
    """A FlopCounterMode that also counts the CPU's fused attention."""
    _register_cpu_attention()
    return flop_counter.FlopCounterMode(display=False)


def best_gflops(matmul, n: int, repeats: int, budget_s: float) -> float:
    """GFLOP/s of the fastest of `repeats` calls of `matmul()` (one n x n x n product, synchronous), after one
    warm-up call (it picks and packs kernels); fewer calls once `budget_s` is spent (a CPU without bf16 units is
    slow at it)."""
    matmul()
    best, start = float("inf"), time.perf_counter()
    for _ in range(repeats):
        if best < float("inf") and time.perf_counter() - start > budget_s:
            break
        t0 = time.perf_counter()
        matmul()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def matmul_gflops(dtype: torch.dtype, device: str | torch.device = "cpu", n: int = 2048, repeats: int = 10,
                  budget_s: float = 3.0) -> float:
    """The best of `repeats` n x n x n torch matmuls in `dtype` on `device` (`best_gflops`), in GFLOP/s at the
    current thread count."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def matmul():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        return best_gflops(matmul, n, repeats, budget_s)


def openvino_matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 10, budget_s: float = 3.0,
                           threads: int | None = None) -> float | None:
    """As `matmul_gflops`, through OpenVINO's CPU plugin with INFERENCE_PRECISION_HINT f32 or bf16 (LATENCY hint,
    `threads` or torch's count); None without OpenVINO, or for bf16 where the plugin lacks native bf16 (its bf16
    hint then runs f32)."""
    from fssam_deploy.hostinfo import openvino_capabilities

    caps = openvino_capabilities()
    hint = {torch.float32: "f32", torch.bfloat16: "bf16"}[dtype]
    if caps is None or (hint == "bf16" and "BF16" not in caps):
        return None
    import numpy as np
    import openvino as ov
    from openvino import opset13 as ops

    a, b = ops.parameter([n, n], np.float32), ops.parameter([n, n], np.float32)
    compiled = ov.Core().compile_model(ov.Model([ops.matmul(a, b, False, False)], [a, b]), "CPU", {
        "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()})
    request = compiled.create_infer_request()
    rng = np.random.default_rng(0)
    feed = [rng.standard_normal((n, n), dtype=np.float32) for _ in range(2)]
    return best_gflops(lambda: request.infer(feed), n, repeats, budget_s)


FLOOR_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def floor_environment(device: str | torch.device = "cpu", threads: int | None = None) -> dict:
    """{"matmul_gflops": {dtype: GFLOP/s}, "matmul_gflops_by_library": {library: {dtype: GFLOP/s}}}, for a
    result's environment: per dtype the fastest matmul 2048^3 over the libraries measured here (torch, and
    OpenVINO on the CPU), which is the floor's rate, and each library's own."""
    by_library = {"torch": {d: matmul_gflops(t, device) for d, t in FLOOR_TORCH_DTYPES.items()}}
    if torch.device(device).type == "cpu":
        ov_rates = {d: openvino_matmul_gflops(t, threads=threads) for d, t in FLOOR_TORCH_DTYPES.items()}
        if any(ov_rates.values()):
            by_library["openvino"] = {d: v for d, v in ov_rates.items() if v}
    best = {d: max(r[d] for r in by_library.values() if r.get(d)) for d in FLOOR_TORCH_DTYPES}
    return {"matmul_gflops": best, "matmul_gflops_by_library": by_library}


def floor_fields(stage_flops: dict[str, int], episode_ms: float, rates: dict[str, float] | None) -> dict:
    """What a bench row says of the floor: GFLOP per stage and in all, and for each measured matmul rate
    (`rates`: {"fp32": GFLOP/s, "bf16": GFLOP/s}) the floor (ms) and the episode's time over it. Both are kept:
    on a CPU without bf16 units (AVX2) the bf16 floor is meaningless and the fp32 one is the machine's."""
    total = sum(stage_flops.values())
    out = {"stage_gflop": {k: v / 1e9 for k, v in stage_flops.items()}, "gflop": total / 1e9}
    for dtype, gflops in (rates or {}).items():
        if gflops:
            floor_ms = total / 1e9 / gflops * 1e3
            out[f"{dtype}_floor_ms"] = floor_ms
            out[f"vs_{dtype}_floor"] = episode_ms / floor_ms if floor_ms else None
    return out
