"""TensorRT runner: one stage's engine under the runner contract, on torch CUDA tensors with no host copies.

Construction reads `engines.json` and refuses stale engines (another GPU, compute capability,
TensorRT version, changed ONNX graph, modified engine file) with an `EngineError` that gives the
exact rebuild command. `infer` sets the input shapes, binds the torch tensors by address
(`set_tensor_address`), allocates the outputs as torch tensors on the device from the engine's
resolved output shapes, and enqueues with `execute_async_v3` on the current torch stream, so a
stage's outputs feed the next stage where they are. Engines with the AOT plugin run without
Python plugin code: its kernel is inside the engine.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fssam_deploy.backends.base import Runner
from fssam_deploy.backends.tensorrt.manifest import check_engine, current_platform, read_trt_manifest
from fssam_deploy.errors import BackendUnavailableError, EngineError, InputError
from fssam_deploy.manifest import Manifest
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.stages import STAGE_SPECS


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError("the tensorrt backend needs TensorRT: pip install tensorrt") from exc
    return trt


def torch_dtype(trt, dtype) -> torch.dtype:
    """The torch dtype of a TensorRT tensor type."""
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.int8: torch.int8, trt.bool: torch.bool,
             trt.uint8: torch.uint8}
    if dtype not in table:
        raise EngineError(f"TensorRT type {dtype} has no torch equivalent here")
    return table[dtype]


class TrtRunner(Runner):
    """One stage's engine: `with TrtRunner(dir, "decoder") as r: r.infer({name: cuda tensor})`; `engines`: the folder,
    or its manifest already read (`read_trt_manifest`).

    Inputs must have the engine's dtype, or float32 (cast on the device); outputs keep the engine's
    dtype and stay on `device`. The batch must lie in the engine's optimisation profile.
    `sync`: wait for the engine in `infer` (so `last_latency_s` is its time); never while a CUDA
    graph is being captured.
    """

    def __init__(self, engines: str | Path | Manifest, stage: str, expect_config: FSSAMConfig | None = None,
                 device: str | torch.device = "cuda", sync: bool = True):
        super().__init__()
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise EngineError(f"TensorRT engines run on CUDA devices, got device {self.device}")
        folder = engines.folder if isinstance(engines, Manifest) else Path(engines)
        if stage not in STAGE_SPECS:
            raise EngineError(f"{folder}: stage {stage!r} is not one of {list(STAGE_SPECS)}")
        self.engine_dir, self.spec, self.sync = folder, STAGE_SPECS[stage], sync
        self.name = f"tensorrt:{stage}"
        self.manifest = engines if isinstance(engines, Manifest) else read_trt_manifest(
            folder, expect_config, here=current_platform(self.device))  # the episode hands its manifest in
        self.path = check_engine(self.engine_dir, self.manifest, stage)
        self.profile = self.manifest["stages"][stage]["profile"]
        self.engine = self.context = None

    def activate_impl(self) -> None:
        trt = _tensorrt()
        with torch.cuda.device(self.device):
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise EngineError(f"{self.path}: TensorRT could not deserialize the engine (see its log above); "
                                  f"rebuild: {self.manifest['rebuild']}")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = lambda n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT  # noqa: E731
        self.input_names = [n for n in names if is_input(n)]
        self.output_names = [n for n in names if not is_input(n)]
        self.dtypes = {n: torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.input_shapes = {n: tuple(None if d < 0 else d for d in self.engine.get_tensor_shape(n))
                             for n in self.input_names}
        self.prunable_inputs = frozenset(self.spec.input_names) - set(self.input_names)
        unknown = sorted(set(names) - set(self.spec.input_names) - set(self.spec.output_names))
        if unknown:
            raise EngineError(f"{self.path}: tensors {unknown} are not in stage {self.spec.name!r}'s spec; rebuild: "
                              f"{self.manifest['rebuild']}")

    def deactivate_impl(self) -> None:
        self.context = self.engine = None

    def check_inputs(self, feed: dict[str, torch.Tensor]) -> None:
        """Names as the base contract; dtype the engine's or float32; shape the engine's, batch within the profile."""
        self.check_names(feed, "engine")
        for name in self.input_names:
            t, want = feed[name], self.input_shapes[name]
            if t.dtype not in (self.dtypes[name], torch.float32):
                raise InputError(f"{self.name}: input {name!r} has dtype {t.dtype}, the engine takes "
                                 f"{self.dtypes[name]} (or float32, cast on the device)")
            if t.dim() != len(want) or any(w is not None and w != g for w, g in zip(want, t.shape)):
                shown = tuple("*" if w is None else w for w in want)
                raise InputError(f"{self.name}: input {name!r} has shape {tuple(t.shape)}, the engine expects {shown}")
            lo, hi = self.profile[name]["min"], self.profile[name]["max"]
            if any(not a <= n <= b for a, n, b in zip(lo, t.shape, hi)):
                raise InputError(f"{self.name}: input {name!r} has shape {tuple(t.shape)}, outside the engine's "
                                 f"profile {tuple(lo)} .. {tuple(hi)}; rebuild with a wider --batch: "
                                 f"{self.manifest['rebuild']}")

    def infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            bound = {}
            for name in self.input_names:
                t = feed[name].to(self.device, self.dtypes[name]).contiguous()
                bound[name] = t  # alive until enqueued (the allocator orders reuse on this stream)
                if not self.context.set_input_shape(name, tuple(t.shape)):
                    raise InputError(f"{self.name}: TensorRT refused shape {tuple(t.shape)} for input {name!r}")
                self.context.set_tensor_address(name, t.data_ptr())
            outs = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise EngineError(f"{self.name}: output {name!r} shape {shape} unresolved after setting inputs "
                                      f"{ {k: tuple(v.shape) for k, v in bound.items()} }")
                outs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                self.context.set_tensor_address(name, outs[name].data_ptr())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise EngineError(f"{self.name}: execute_async_v3 failed (see TensorRT's log above)")
            if self.sync and not torch.cuda.is_current_stream_capturing():
                stream.synchronize()
        return outs
