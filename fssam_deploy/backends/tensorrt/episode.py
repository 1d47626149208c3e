"""The episode over TensorRT engines, and the query side captured as one CUDA graph.

`tensorrt_episode(engine_dir)` is `Episode({stage: TrtRunner(...)}, cfg, device)`: the same orchestration
as the ONNX Runtime, AOTInductor and PyTorch episodes, with every tensor kept on the GPU (any
`Episode` can be recorded into a CUDA graph: it skips its syncs while the stream is capturing).
`CapturedQuery` records `segment_query` (image encoder, DINOv2, priors, memory encoder,
refinement, decoder: every TensorRT enqueue and every torch op between them) for fixed shapes
into one CUDA graph and replays it after copying new inputs into its static buffers.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fssam_deploy.backends.tensorrt.manifest import current_platform, read_trt_manifest
from fssam_deploy.backends.tensorrt.runner import TrtRunner
from fssam_deploy.episode import Episode, SupportFeatures
from fssam_deploy.errors import InputError
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.stages import STAGE_SPECS


def tensorrt_episode(engine_dir: str | Path, expect: FSSAMConfig | None = None,
                     device: str | torch.device = "cuda", cuda_graph: bool = False) -> Episode:
    """`segment(query, supports, masks) -> logits (B, 1, S, S)` (float32) through one engine per stage.

    `expect`: refuse engines built for another config. Engines are checked against this GPU,
    TensorRT version and their ONNX graphs first (see `backends.tensorrt.manifest`), once for all stages.
    `cuda_graph`: the query side replayed as one CUDA graph (`GraphEpisode`).
    """
    manifest = read_trt_manifest(engine_dir, expect, here=current_platform(device))
    manifest.check_stages(STAGE_SPECS)
    runners = {name: TrtRunner(manifest, name, expect, device) for name in STAGE_SPECS}
    episode = (GraphEpisode if cuda_graph else Episode)(runners, manifest.config, device)
    episode.manifest = manifest
    episode.settings = {"engine_dir": str(engine_dir), "precision": manifest["precision"],
                        "batch_range": manifest["batch"],
                        "plugin_stages": [s for s, e in manifest["stages"].items() if e["plugin"]],
                        "tensorrt": manifest["platform"]["tensorrt"], "cuda_graph": cuda_graph}
    return episode


class CapturedQuery:
    """`segment_query` for one query shape and one support-set shape as a CUDA graph.

    `segment(query, support)` copies both into the graph's static buffers (skipped for the support
    it was captured with), replays, and returns a copy of the logits. Shapes must match the capture.
    """

    def __init__(self, episode: Episode, query_shape: tuple, support: SupportFeatures, warmup: int = 2):
        dev = episode.device
        self.episode = episode
        self.query = torch.zeros(tuple(query_shape), device=dev)
        self.support = SupportFeatures(**{k: t.contiguous().clone() for k, t in support.tensors().items()})
        self._source = support
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # first enqueues (TensorRT's lazy setup) outside the capture
            for _ in range(warmup):
                episode.segment_query(self.query, self.support)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = episode.segment_query(self.query, self.support)

    def _copy_in(self, name: str, dst: torch.Tensor, src: torch.Tensor) -> None:
        if tuple(src.shape) != tuple(dst.shape):
            raise InputError(f"captured query: {name} has shape {tuple(src.shape)}, the CUDA graph was captured for "
                             f"{tuple(dst.shape)}; capture another CapturedQuery for this shape")
        dst.copy_(src)

    def segment(self, query: torch.Tensor, support: SupportFeatures | None = None) -> torch.Tensor:
        """query (B, 3, S, S) -> logits (B, 1, S, S); `support` None: the one captured with."""
        self._copy_in("query", self.query, query)
        if support is not None and support is not self._source:
            for name, dst in self.support.tensors().items():
                self._copy_in(f"support {name}", dst, getattr(support, name))
            self._source = support
        self.graph.replay()
        return self.logits.clone()


class GraphEpisode(Episode):
    """An Episode whose query side is replayed as one CUDA graph (`CapturedQuery`), captured anew whenever the
    query or support shapes change; the first call for a shape pays the capture. Timed as one `query_graph`."""

    def __init__(self, runners, cfg, device):
        super().__init__(runners, cfg, device)
        self._captured, self._key, self._capturing = None, None, False

    def segment_query(self, query: torch.Tensor, sup: SupportFeatures) -> torch.Tensor:
        if self._capturing:  # CapturedQuery is recording (or warming up) the plain query side
            return super().segment_query(query, sup)
        key = (tuple(query.shape), *(tuple(t.shape) for t in sup.tensors().values()))
        if key != self._key:
            self._capturing = True
            try:
                self._captured, self._key = CapturedQuery(self, query.shape, sup), key
            finally:
                self._capturing = False
        t0 = time.perf_counter()
        logits = self._captured.segment(query.to(self.device), sup)
        if self.stage_times is not None:
            torch.cuda.synchronize(self.device)
            self.stage_times["query_graph"] = self.stage_times.get("query_graph", 0.0) + time.perf_counter() - t0
        return logits
