"""The runner contract every backend follows (after Polygraphy's BaseRunner)."""

from __future__ import annotations

import time

import torch

from ..errors import InputError
from ..export.specs import STAGE_SPECS, stage_module
from ..model.config import FSSAMConfig


class Runner:
    """`with runner: outputs = runner.infer({name: tensor})`; validates inputs, records latency.

    Subclasses set `name`, `input_shapes` ({name: shape with None for dynamic axes}) and
    implement `activate_impl`, `deactivate_impl` and `infer_impl`.
    """

    name = "runner"
    input_shapes: dict[str, tuple] = {}
    # inputs the stage declares that the graph dropped as unused (e.g. the memory encoder's
    # high-res features, which only feed mask upscaling the pointer does not need)
    prunable_inputs: frozenset = frozenset()

    def __init__(self):
        self.is_active = False
        self.last_latency_s: float | None = None

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        if not self.is_active:
            self.activate_impl()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def check_names(self, feed: dict[str, torch.Tensor], what: str = "graph") -> None:
        """Every input of the `what` present; nothing else but inputs the exporter pruned from it."""
        missing = sorted(set(self.input_shapes) - set(feed))
        extra = sorted(set(feed) - set(self.input_shapes) - self.prunable_inputs)
        if missing or extra:
            raise InputError(f"{self.name}: inputs {sorted(feed)} do not match the {what}'s "
                             f"{sorted(self.input_shapes)} (missing {missing}, unexpected {extra})")

    def check_inputs(self, feed: dict[str, torch.Tensor]) -> None:
        self.check_names(feed)
        for k, t in feed.items():
            if k not in self.input_shapes:
                continue
            want = self.input_shapes[k]
            if t.dtype != torch.float32:
                raise InputError(f"{self.name}: input {k!r} must be float32, got {t.dtype}")
            if len(want) != t.dim() or any(w is not None and w != g for w, g in zip(want, t.shape)):
                shown = "(" + ", ".join("*" if w is None else str(w) for w in want) + ")"
                raise InputError(f"{self.name}: input {k!r} has shape {tuple(t.shape)}, the graph expects {shown}")

    def infer(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.is_active:
            raise RuntimeError(f"{self.name}: activate the runner first (use it as a context manager)")
        self.check_inputs(feed)
        feed = {k: v for k, v in feed.items() if k in self.input_shapes}
        t0 = time.perf_counter()
        out = self.infer_impl(feed)
        self.last_latency_s = time.perf_counter() - t0
        return out

    def activate_impl(self) -> None:  # pragma: no cover - trivial default
        pass

    def deactivate_impl(self) -> None:  # pragma: no cover - trivial default
        pass

    def infer_impl(self, feed):
        """Abstract: each backend's runner runs its graph here."""
        raise NotImplementedError(f"{type(self).__name__} must implement infer_impl")


class TorchRunner(Runner):
    """A stage nn.Module under the runner contract (`input_shapes`: None for any size)."""

    def __init__(self, module: torch.nn.Module, spec, input_shapes: dict[str, tuple]):
        super().__init__()
        self.module, self.spec, self.name = module, spec, f"torch:{spec.name}"
        self.input_shapes = input_shapes

    def infer_impl(self, feed):
        with torch.inference_mode():
            outs = self.module(*(feed[n] for n in self.spec.input_names))
        outs = outs if isinstance(outs, tuple) else (outs,)
        return dict(zip(self.spec.output_names, outs))


def torch_runners(stages, cfg: FSSAMConfig) -> dict[str, TorchRunner]:
    """The PyTorch stage modules of `stages` (`model.build_stages`) as runners keyed by stage name.

    `Episode(torch_runners(stages, cfg), cfg, device)` runs the eager stages under the same
    orchestration as the exported graphs. Batch and shots are free (None), as in `Pipeline`;
    every other axis is checked against the spec.
    """
    free = {"B", "M", "K"}
    runners = {}
    for name, spec in STAGE_SPECS.items():
        shapes = {t.name: tuple(None if d in free else n for d, n in zip(t.shape, t.concrete(cfg, 1, 1)))
                  for t in spec.inputs}
        runners[name] = TorchRunner(stage_module(stages, name), spec, shapes)
    return runners
