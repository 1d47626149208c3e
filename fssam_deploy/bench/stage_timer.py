"""Per-stage latency of the PyTorch pipeline, with forward hooks on the stage modules."""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from ..export.specs import STAGE_SPECS, stage_module
from .timing import synchronize


class StageTimer:
    """Records the wall time of every stage call while installed (`with StageTimer(stages, dev) as t`).

    `t.times` maps a stage name (those of `STAGE_SPECS`, as the runtime's `Episode.stage_times`)
    to the summed seconds of its calls since the last `reset()`.
    The device is synchronised around each stage, which a timed run needs anyway.
    """

    def __init__(self, stages, device=None):
        self.stages = stages
        self.device = device
        self.times: dict[str, float] = defaultdict(float)
        self._handles: list = []
        self._t0: dict[str, float] = {}

    def reset(self) -> None:
        self.times = defaultdict(float)

    def _pre(self, name):
        def hook(_module, _inputs):
            synchronize(self.device)
            self._t0[name] = time.perf_counter()

        return hook

    def _post(self, name):
        def hook(_module, _inputs, _outputs):
            synchronize(self.device)
            self.times[name] += time.perf_counter() - self._t0.pop(name)

        return hook

    def __enter__(self) -> StageTimer:
        for name in STAGE_SPECS:
            m: torch.nn.Module = stage_module(self.stages, name)
            self._handles.append(m.register_forward_pre_hook(self._pre(name)))
            self._handles.append(m.register_forward_hook(self._post(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
