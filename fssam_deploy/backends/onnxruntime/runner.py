"""ONNX Runtime runner: IO binding on torch tensors, so stage outputs stay where they are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fssam_deploy.backends.base import Runner
from fssam_deploy.errors import BackendUnavailableError, EngineError


def available_providers(device: torch.device) -> list[str]:
    """TensorRT, then CUDA execution providers for a CUDA device when installed; else CPU."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailableError("the onnxruntime backend needs: pip install 'fssam-deploy[onnx]'") from exc
    have = ort.get_available_providers()
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"] if device.type == "cuda" else []
    return [p for p in wanted if p in have] + ["CPUExecutionProvider"]


class OnnxRuntimeRunner(Runner):
    """One stage graph. `infer` binds torch tensors as inputs and preallocated torch outputs.

    `precision`: the graph folder's; a bf16 graph runs as its fp32 emulation (`onnx.bf16.emulate_bf16`).
    """

    def __init__(self, path: str | Path, spec, output_shape_fn, device="cpu", threads: int | None = None,
                 precision: str = "fp32"):
        super().__init__()
        self.path, self.spec, self.name = Path(path), spec, f"onnxruntime:{spec.name}"
        self.device = torch.device(device)
        self.output_shape_fn = output_shape_fn  # batch -> {output name: shape}
        self.threads = threads
        self.precision = precision
        self.session = None

    def activate_impl(self) -> None:
        import onnxruntime as ort

        if not self.path.is_file():
            raise EngineError(f"{self.path}: ONNX graph not found")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        # no busy-waiting worker threads between runs: they would steal the cores from the
        # other stages (and from PyTorch in side-by-side measurements)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        from fssam_deploy.onnx.bf16 import ort_model

        rebuild = f"export the graphs again with `fssam export --out {self.path.parent}`"
        try:
            self.session = ort.InferenceSession(ort_model(self.path, self.precision), opts,
                                                providers=available_providers(self.device))
        except Exception as exc:  # noqa: BLE001 - InvalidProtobuf, Fail, InvalidGraph, ...: a broken graph file
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise EngineError(f"{self.path}: ONNX Runtime cannot load the graph of stage {self.spec.name!r} "
                              f"({type(exc).__name__}: {reason}); {rebuild}") from None
        outputs = sorted(o.name for o in self.session.get_outputs())
        if outputs != sorted(self.spec.output_names):
            raise EngineError(f"{self.path}: graph outputs {outputs} are not those of stage {self.spec.name!r} "
                              f"({sorted(self.spec.output_names)}): another stage's graph? {rebuild}")
        self.input_shapes = {i.name: tuple(d if isinstance(d, int) else None for d in i.shape)
                             for i in self.session.get_inputs()}
        self.prunable_inputs = frozenset(self.spec.input_names) - set(self.input_shapes)

    def deactivate_impl(self) -> None:
        self.session = None

    def _bind(self, io, name, t: torch.Tensor, output: bool) -> None:
        dev = "cuda" if t.device.type == "cuda" else "cpu"
        idx = t.device.index or 0
        bind = io.bind_output if output else io.bind_input
        bind(name, dev, idx, np.float32, list(t.shape), t.data_ptr())

    def infer_impl(self, feed):
        io = self.session.io_binding()
        feed = {k: v.to(self.device).contiguous() for k, v in feed.items()}
        for k, v in feed.items():
            self._bind(io, k, v, output=False)
        batch = next(iter(feed.values())).shape[0]
        outs = {n: torch.empty(s, dtype=torch.float32, device=self.device)
                for n, s in self.output_shape_fn(batch).items()}
        for k, v in outs.items():
            self._bind(io, k, v, output=True)
        self.session.run_with_iobinding(io)
        return outs
