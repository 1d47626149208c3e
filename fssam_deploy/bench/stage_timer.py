"""Per-stage latency of the PyTorch pipeline, with forward hooks on the stage modules."""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from .timing import synchronize

# the modules the pipeline calls, under the names a report shows
TIMED_MODULES = {
    "image_encoder": lambda s: s.image_encoder,
    "dino": lambda s: s.prior.dino,
    "prior": lambda s: s.prior.prior,
    "prototypes": lambda s: s.prior.prototypes,
    "memory_encoder": lambda s: s.memory_encoder,
    "refinement": lambda s: s.refinement,
    "decoder": lambda s: s.decoder,
}


class StageTimer:
    """Records the wall time of every stage call while installed (`with StageTimer(stages, dev) as t`).

    `t.times` maps a stage name to the summed seconds of its calls since the last `reset()`.
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
        for name, get in TIMED_MODULES.items():
            m: torch.nn.Module = get(self.stages)
            self._handles.append(m.register_forward_pre_hook(self._pre(name)))
            self._handles.append(m.register_forward_hook(self._post(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
