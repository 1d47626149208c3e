"""The GEMM floor of an episode: its FLOPs per stage (counted on the PyTorch stage modules) over the matmul
rate measured on this machine, so a backend's time can be read against what the hardware could do.

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


def matmul_gflops(dtype: torch.dtype, device: str | torch.device = "cpu", n: int = 2048, repeats: int = 10,
                  budget_s: float = 3.0) -> float:
    """The best of `repeats` n x n x n matmuls in `dtype` on `device` (fewer once `budget_s` is spent: a CPU
    without bf16 units is slow at it), in GFLOP/s at the current thread count."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        a @ b  # warm-up: the first call picks and packs kernels
        best, start = float("inf"), time.perf_counter()
        for _ in range(repeats):
            if best < float("inf") and time.perf_counter() - start > budget_s:
                break
            sync()
            t0 = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


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
