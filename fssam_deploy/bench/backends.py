"""Episode backends for benchmarks and cross-backend checks: one small adapter per backend.

Every backend answers `encode_supports(supports, masks) -> handle` and
`segment_query(query, handle) -> logits (B, 1, S, S)` on the same inputs, and reports the
seconds spent in each stage of its last call (`stage_times`).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from ..errors import BackendUnavailableError, ConfigError
from ..export.onnx_export import read_manifest
from ..model import FSSAMConfig, Pipeline, load_weights, random_weights
from .stage_timer import StageTimer


class TorchBackend:
    """PyTorch eager (optionally bf16 autocast on CUDA, the fused attention, or torch.compile)."""

    def __init__(self, name: str, cfg: FSSAMConfig, weights, device, autocast_bf16=False,
                 attention="torch", compile_stages=False, compile_mode=None):
        self.name, self.device = name, torch.device(device)
        self.autocast_bf16 = autocast_bf16
        self.pipeline = Pipeline(weights, attention_backend=attention).to(self.device).eval()
        if compile_stages:
            for mod in self.pipeline.stage_modules.values():
                mod.forward = compiled_forward(mod.forward, compile_mode)
        self.timer = StageTimer(self.pipeline.stages, self.device)
        self.settings = {"autocast_bf16": autocast_bf16, "attention": attention, "torch_compile": compile_stages,
                         "compile_mode": compile_mode}

    def _ctx(self):
        if self.autocast_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def encode_supports(self, supports, masks):
        with self._ctx():
            return self.pipeline.encode_supports(supports.to(self.device), masks.to(self.device))

    def segment_query(self, query, handle):
        with self._ctx():
            return self.pipeline.segment_query(query.to(self.device), handle).float()

    @contextlib.contextmanager
    def timing_stages(self):
        """Inside, `self.timer.times` collects per-stage seconds."""
        self.timer.reset()
        with self.timer:
            yield self.timer.times


def compiled_forward(forward, mode: str | None):
    """torch.compile of a stage's forward. Under CUDA graphs ("reduce-overhead") a stage's outputs live in
    the graph's static buffers, overwritten by its next replay (the image encoder runs on the supports,
    then the query): they are cloned on the way out."""
    compiled = torch.compile(forward, dynamic=False, mode=mode)
    if mode != "reduce-overhead":
        return compiled

    def forward_cloned(*args):
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(*args)
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()

    return forward_cloned


def _needs_cuda(name: str, device: torch.device) -> None:
    if device.type != "cuda":
        raise BackendUnavailableError(f"backend {name!r} runs on a CUDA device only (got --device {device})")


class EpisodeBackend:
    """A backend that drives a `runtime.episode.Episode` (ONNX Runtime, AOTInductor, TensorRT): subclasses set
    `name`, `device`, `episode` and `settings`."""

    def encode_supports(self, supports, masks):
        return self.episode.encode_supports(supports.to(self.device), masks.to(self.device))

    def segment_query(self, query, handle):
        return self.episode.segment_query(query.to(self.device), handle)

    @contextlib.contextmanager
    def timing_stages(self):
        self.episode.stage_times = {}
        yield self.episode.stage_times


class OnnxRuntimeBackend(EpisodeBackend):
    """ONNX Runtime over exported graphs; exports them (dynamic batch) when no engine dir is given."""

    def __init__(self, cfg: FSSAMConfig, device, engine_dir=None, checkpoint=None, seed: int = 0, threads=None,
                 int8: bool = False):
        import tempfile

        from ..export.onnx_export import export_onnx
        from ..export.quantize import quantize_engine_dir
        from ..runtime.episode import OnnxEpisode

        self.name, self.device = "onnxruntime-int8" if int8 else "onnxruntime", torch.device(device)
        if engine_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fssam-bench-onnx-")
            engine_dir = export_onnx(cfg, f"{self._tmp.name}/graphs", checkpoint, seed, batch="dynamic",
                                     progress=False)
        if int8 and read_manifest(engine_dir).get("precision") != "int8":
            self._tmp_int8 = tempfile.TemporaryDirectory(prefix="fssam-bench-int8-")
            engine_dir = quantize_engine_dir(engine_dir, f"{self._tmp_int8.name}/int8")
        self.episode = OnnxEpisode(engine_dir, expect=cfg, device=device, threads=threads)
        self.settings = {"engine_dir": str(engine_dir), "providers": self.episode.runners["decoder"].session
                         .get_providers(), "precision": self.episode.manifest.get("precision", "fp32"),
                         "quantized": {k: e["quantized"] for k, e in self.episode.manifest["stages"].items()
                                       if "quantized" in e}}



class AotiBackend(EpisodeBackend):
    """AOTInductor packages (`fssam build --format aoti`); compiled here (static batch 1) when no dir is given."""

    def __init__(self, cfg: FSSAMConfig, device, engine_dir=None, checkpoint=None, seed: int = 0,
                 precision: str = "fp32"):
        import tempfile

        from ..export.aoti import build_aoti
        from ..runtime.aoti_runner import AotiEpisode

        self.name = "aoti" if precision == "fp32" else f"aoti-{precision}"
        self.device = torch.device(device)
        if engine_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fssam-bench-aoti-")
            engine_dir = build_aoti(cfg, f"{self._tmp.name}/aoti", checkpoint, seed, device=self.device,
                                    precision=precision, progress=False)
        self.episode = AotiEpisode(engine_dir, expect_config=cfg, device=self.device)
        self.settings = {"engine_dir": str(engine_dir), "package_batch": self.episode.manifest["batch"],
                         "precision": self.episode.manifest.get("precision", "fp32"),
                         "note": "static-batch packages: larger batches run in chunks"}


def make_backend(name: str, cfg: FSSAMConfig, weights, device, engine_dir=None, checkpoint=None, seed=0,
                 threads=None):
    """Build a backend by name: torch, torch-bf16, torch-fused, torch-compile, onnxruntime, aoti."""
    device = torch.device(device)
    if name == "torch":
        return TorchBackend(name, cfg, weights, device)
    if name == "torch-bf16":
        _needs_cuda(name, device)
        return TorchBackend(name, cfg, weights, device, autocast_bf16=True)
    if name == "torch-fused":
        _needs_cuda(name, device)
        return TorchBackend(name, cfg, weights, device, attention="op")
    if name == "torch-compile":
        attention = "op" if device.type == "cuda" else "torch"
        return TorchBackend(name, cfg, weights, device, attention=attention, compile_stages=True)
    if name == "torch-compile-bf16":  # Inductor + CUDA graphs (reduce-overhead) under bf16 autocast
        _needs_cuda(name, device)
        return TorchBackend(name, cfg, weights, device, autocast_bf16=True, attention="op", compile_stages=True,
                            compile_mode="reduce-overhead")
    if name == "onnxruntime":
        return OnnxRuntimeBackend(cfg, device, engine_dir, checkpoint, seed, threads)
    if name == "onnxruntime-int8":  # the image encoder and DINOv2 quantized (from --engine-dir's fp32 graphs)
        return OnnxRuntimeBackend(cfg, device, engine_dir, checkpoint, seed, threads, int8=True)
    if name == "aoti":
        return AotiBackend(cfg, device, engine_dir, checkpoint, seed)
    if name == "aoti-bf16":  # packages compiled under bf16 autocast (the reference's GPU precision)
        return AotiBackend(cfg, device, engine_dir, checkpoint, seed, precision="bf16")
    if name in EXTERNAL_BACKENDS:
        return EXTERNAL_BACKENDS[name](cfg, weights, device, engine_dir)
    known = ["torch", "torch-bf16", "torch-fused", "torch-compile", "torch-compile-bf16", "onnxruntime",
             "onnxruntime-int8", "aoti", "aoti-bf16", *EXTERNAL_BACKENDS]
    raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(known)}")


def _tensorrt_backend(*args, **kwargs):
    from .tensorrt_backend import make_tensorrt_backend

    return make_tensorrt_backend(*args, **kwargs)


def _tensorrt_graph_backend(*args, **kwargs):
    from .tensorrt_backend import make_tensorrt_graph_backend

    return make_tensorrt_graph_backend(*args, **kwargs)


# Backends with optional dependencies: factories (cfg, weights, device, engine_dir) imported on use.
EXTERNAL_BACKENDS: dict = {"tensorrt": _tensorrt_backend, "tensorrt-graph": _tensorrt_graph_backend}


def load_bench_weights(cfg: FSSAMConfig, checkpoint=None, seed: int = 0):
    """The weights every backend of one benchmark shares."""
    weights = random_weights(cfg, seed)
    if checkpoint:
        load_weights(weights, checkpoint)
    else:
        warnings.warn("benchmarking RANDOM weights: latency is real, masks are not", stacklevel=2)
    return weights
