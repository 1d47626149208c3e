"""The runner contract every backend follows (after Polygraphy's BaseRunner)."""

from __future__ import annotations

import time

import torch

from fssam_deploy.errors import InputError


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

    #: the dtypes `infer` takes (the exported graphs' inputs are float32)
    input_dtypes: tuple = (torch.float32,)

    def check_inputs(self, feed: dict[str, torch.Tensor]) -> None:
        self.check_names(feed)
        for k, t in feed.items():
            if k not in self.input_shapes:
                continue
            want = self.input_shapes[k]
            if t.dtype not in self.input_dtypes:
                want_dtype = str(self.input_dtypes[0]).removeprefix("torch.")
                raise InputError(f"{self.name}: input {k!r} must be {want_dtype}, got {t.dtype}")
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
