"""Timing that a benchmark can trust: warm-up, device sync, CUDA events, robust statistics."""

from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


def synchronize(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Stats:
    """Latency samples in seconds, summarised as median / p90 / mean / min (milliseconds)."""

    samples: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples) * 1e3 if self.samples else float("nan")

    @property
    def p90_ms(self) -> float:
        if not self.samples:
            return float("nan")
        s = sorted(self.samples)
        return s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))] * 1e3

    def to_dict(self) -> dict:
        return {"median_ms": self.median_ms, "p90_ms": self.p90_ms, "n": len(self.samples),
                "mean_ms": statistics.fmean(self.samples) * 1e3 if self.samples else float("nan"),
                "min_ms": min(self.samples) * 1e3 if self.samples else float("nan")}


class Timer:
    """Wall time of a region, with the device synchronised at both ends (CUDA events on GPU)."""

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else None
        self.cuda = self.device is not None and self.device.type == "cuda"

    @contextmanager
    def measure(self, into: Stats):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            end.synchronize()
            into.add(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            yield
            into.add(time.perf_counter() - t0)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MiB), from the OS."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except ImportError:  # not on POSIX
        return float("nan")


def current_rss_mb() -> float:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")
