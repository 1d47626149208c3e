"""The episode over TensorRT engines, and the query side captured as one CUDA graph.

`TrtEpisode(engine_dir)` is `Episode({stage: TrtRunner(...)}, cfg, device)`: the same orchestration
as the ONNX Runtime, AOTInductor and PyTorch episodes, with every tensor kept on the GPU (any
`Episode` can be recorded into a CUDA graph: it skips its syncs while the stream is capturing).
`CapturedQuery` records `segment_query` (image encoder, DINOv2, priors, memory encoder,
refinement, decoder: every TensorRT enqueue and every torch op between them) for fixed shapes
into one CUDA graph and replays it after copying new inputs into its static buffers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError
from ..export.specs import STAGE_SPECS
from ..export.tensorrt_manifest import current_platform, read_trt_manifest
from ..model.config import FSSAMConfig
from .episode import Episode, EpisodeSupport
from .tensorrt_runner import TrtRunner


class TrtEpisode(Episode):
    """`segment(query, supports, masks) -> logits (B, 1, S, S)` (float32) through one engine per stage.

    `expect`: refuse engines built for another config. Engines are checked against this GPU,
    TensorRT version and their ONNX graphs first (see `export.tensorrt_manifest`).
    """

    def __init__(self, engine_dir: str | Path, expect: FSSAMConfig | None = None, device: str | torch.device = "cuda"):
        self.engine_dir = Path(engine_dir)
        self.manifest = read_trt_manifest(self.engine_dir, expect, here=current_platform(device))
        cfg = FSSAMConfig.from_dict(self.manifest["config"])
        runners = {name: TrtRunner(self.engine_dir, name, expect, device) for name in STAGE_SPECS}
        super().__init__(runners, cfg, device)

    def segment_query(self, query: torch.Tensor, sup: EpisodeSupport) -> torch.Tensor:
        return super().segment_query(query, sup).float()  # fp16 engines return fp16 logits


class CapturedQuery:
    """`segment_query` for one query shape and one support-set shape as a CUDA graph.

    `segment(query, support)` copies both into the graph's static buffers (skipped for the support
    it was captured with), replays, and returns a copy of the logits. Shapes must match the capture.
    """

    def __init__(self, episode: Episode, query_shape: tuple, support: EpisodeSupport, warmup: int = 2):
        dev = episode.device
        self.episode = episode
        self.query = torch.zeros(tuple(query_shape), device=dev)
        self.support = EpisodeSupport(*(t.contiguous().clone() for t in support.__dict__.values()))
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

    def segment(self, query: torch.Tensor, support: EpisodeSupport | None = None) -> torch.Tensor:
        """query (B, 3, S, S) -> logits (B, 1, S, S); `support` None: the one captured with."""
        self._copy_in("query", self.query, query)
        if support is not None and support is not self._source:
            for name, dst in self.support.__dict__.items():
                self._copy_in(f"support {name}", dst, getattr(support, name))
            self._source = support
        self.graph.replay()
        return self.logits.clone()
