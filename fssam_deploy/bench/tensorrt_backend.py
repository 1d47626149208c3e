"""The TensorRT episode as a benchmark backend (same interface as the adapters of `bench.backends`).

`make_tensorrt_backend(cfg, weights, device, engine_dir)`: engines from `engine_dir`
(`fssam build --format tensorrt`), or, when it is None, exported and built here from `weights`
(dynamic batch 1..8, fp32, with the plugin). `make_tensorrt_graph_backend(...)`: the same, with
the query side replayed as one CUDA graph (`runtime.tensorrt_episode.CapturedQuery`).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ..errors import BackendUnavailableError
from ..model import FSSAMConfig
from .backends import EpisodeBackend

BENCH_BATCH = (1, 1, 8)  # the batch range of engines built here


def build_bench_engines(cfg: FSSAMConfig, weights, workdir: str | Path) -> Path:
    """Export `weights` (via a checkpoint) to dynamic-batch ONNX with plugin variants, and build fp32 engines."""
    from ..export.onnx_export import export_onnx
    from ..export.onnx_plugin_variant import export_plugin_variants
    from ..export.tensorrt_build import build_tensorrt
    from ..model import save_fssam_checkpoint

    workdir = Path(workdir)
    ckpt = workdir / "weights.pth"
    save_fssam_checkpoint(weights, ckpt)
    graphs = export_onnx(cfg, workdir / "graphs", checkpoint=ckpt, batch="dynamic", progress=False)
    export_plugin_variants(cfg, graphs, checkpoint=ckpt)
    return build_tensorrt(graphs, workdir / "engines", batch=BENCH_BATCH, progress=False)


class TensorRTBackend(EpisodeBackend):
    """`encode_supports` / `segment_query` / `timing_stages` over a `TrtEpisode` (optionally a captured query side)."""

    def __init__(self, cfg: FSSAMConfig, weights, device, engine_dir=None, cuda_graph: bool = False):
        from ..runtime.tensorrt_episode import TrtEpisode

        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise BackendUnavailableError(f"backend 'tensorrt' runs on a CUDA device only (got --device {self.device})")
        self.name = "tensorrt-graph" if cuda_graph else "tensorrt"
        if engine_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fssam-bench-trt-")
            engine_dir = build_bench_engines(cfg, weights, self._tmp.name)
        self.episode = TrtEpisode(engine_dir, expect=cfg, device=self.device)
        self.cuda_graph, self._captured, self._key = cuda_graph, None, None
        m = self.episode.manifest
        self.settings = {"engine_dir": str(engine_dir), "precision": m["precision"], "batch_range": m["batch"],
                         "plugin_stages": [s for s, e in m["stages"].items() if e["plugin"]],
                         "tensorrt": m["platform"]["tensorrt"], "cuda_graph": cuda_graph}

    def segment_query(self, query, handle):
        if not self.cuda_graph:
            return super().segment_query(query, handle)
        query = query.to(self.device)
        from ..runtime.tensorrt_episode import CapturedQuery

        key = (tuple(query.shape), *(tuple(t.shape) for t in handle.__dict__.values()))
        if key != self._key:
            self._captured, self._key = CapturedQuery(self.episode, query.shape, handle), key
        t0 = time.perf_counter()
        logits = self._captured.segment(query, handle)
        torch.cuda.synchronize(self.device)
        times = self.episode.stage_times
        times["query_graph"] = times.get("query_graph", 0.0) + time.perf_counter() - t0
        return logits


def make_tensorrt_backend(cfg: FSSAMConfig, weights, device, engine_dir=None) -> TensorRTBackend:
    """Factory for `bench.backends.EXTERNAL_BACKENDS["tensorrt"]`."""
    return TensorRTBackend(cfg, weights, device, engine_dir)


def make_tensorrt_graph_backend(cfg: FSSAMConfig, weights, device, engine_dir=None) -> TensorRTBackend:
    """Factory for `bench.backends.EXTERNAL_BACKENDS["tensorrt-graph"]`: the query side as a CUDA graph."""
    return TensorRTBackend(cfg, weights, device, engine_dir, cuda_graph=True)
