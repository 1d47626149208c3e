"""The episode, stage by stage, over any set of runners (the refinement loop is in its graph).

`Episode` composes the stages of `export.specs.STAGE_SPECS` exactly as `model.Pipeline` composes
the PyTorch modules; it knows nothing of the backend. `OnnxEpisode` builds ONNX Runtime runners
and an `Episode` over them; `runtime.aoti_runner.AotiEpisode` does the same with AOTInductor
packages, and `runtime.base.torch_runners` wraps the PyTorch stages themselves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import EngineError
from ..export.onnx_export import read_manifest
from ..export.specs import STAGE_SPECS
from ..model.config import FSSAMConfig
from ..model.validate import check_episode, check_images
from .base import Runner
from .onnxruntime_runner import OnnxRuntimeRunner


def run_stage(runner: Runner, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """runner.infer, split into the graph's static batch when the feed's batch is larger."""
    first = runner.spec.input_names[0]
    static = runner.input_shapes[first][0]
    batch = feed[first].shape[0]
    if static is None or static == batch:
        return runner.infer(feed)
    parts = [runner.infer({k: v[i : i + static] for k, v in feed.items()}) for i in range(0, batch, static)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@dataclass
class EpisodeSupport:
    """A support set's side of an episode, kept on the device and reused for every query."""

    dino: torch.Tensor  # (B, K, Cd, g, g) DINOv2 features
    masks: torch.Tensor  # (B, K, S, S) in [0, 1]
    memory: torch.Tensor  # (B, K, 64, h, h)
    obj_ptr: torch.Tensor  # (B, K, 256)

    def expand(self, batch: int) -> EpisodeSupport:
        """One support set (B = 1) shared by `batch` queries (views, no copies)."""
        return EpisodeSupport(*(t.expand(batch, *t.shape[1:]) for t in self.__dict__.values()))


class Episode:
    """`segment(query, supports, masks) -> logits (B, 1, S, S)` over one runner per stage.

    Stages run in `STAGE_SPECS` order: the support side is image_encoder, dino_features,
    memory_encoder (once per support set); the query side is image_encoder, dino_features,
    prior, memory_encoder, refinement, decoder.

    `runners` maps every name of `STAGE_SPECS` to an object with the `Runner` contract (`spec`,
    `input_shapes`, `infer`); they are activated here and released by `close()`. Tensors are
    moved to `device`, where the runners keep their outputs. `stage_times` sums the seconds of
    each stage's calls; assign it a fresh dict to restart the count. A batch larger than a
    runner's static one runs in chunks.
    """

    def __init__(self, runners: dict[str, Runner], cfg: FSSAMConfig, device: str | torch.device = "cpu"):
        missing = [name for name in STAGE_SPECS if name not in runners]
        if missing:
            raise EngineError(f"episode: no runner for stages {missing}; every stage of STAGE_SPECS "
                              f"({list(STAGE_SPECS)}) needs one (got {sorted(runners)})")
        self.runners = runners
        self.cfg = cfg
        self.device = torch.device(device)
        self.stage_times: dict[str, float] = {}
        for runner in self.runners.values():
            runner.activate()

    def close(self) -> None:
        """Release every runner (sessions, packages, engines)."""
        for runner in self.runners.values():
            runner.deactivate()

    def __enter__(self) -> Episode:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, name: str, **feed: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return run_stage(self.runners[name], feed)  # being recorded into a CUDA graph: no sync, no timing
        t0 = time.perf_counter()
        out = run_stage(self.runners[name], feed)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # a stage's time is its kernels' time
        self.stage_times[name] = self.stage_times.get(name, 0.0) + time.perf_counter() - t0
        return out

    def encode_supports(self, supports: torch.Tensor, masks: torch.Tensor) -> EpisodeSupport:
        """Support side: supports (B, K, 3, S, S) and cleaned masks (B, K, S, S), on the device."""
        b, k = supports.shape[:2]
        flat = supports.flatten(0, 1)  # (B*K, 3, S, S)
        f = self._run("image_encoder", images=flat)
        dino = self._run("dino_features", images=flat)["dino_feat"]  # (B*K, Cd, g, g)
        m = self._run("memory_encoder", feat=f["feat"], feat_s0=f["feat_s0"], feat_s1=f["feat_s1"],
                      mask=masks.reshape(b * k, 1, *masks.shape[-2:]))
        return EpisodeSupport(dino.reshape(b, k, *dino.shape[1:]), masks,
                              m["memory"].reshape(b, k, *m["memory"].shape[1:]), m["obj_ptr"].reshape(b, k, -1))

    def segment_query(self, query: torch.Tensor, sup: EpisodeSupport) -> torch.Tensor:
        """Query side: query (B, 3, S, S) on the device -> logits (B, 1, S, S)."""
        b = query.shape[0]
        f = self._run("image_encoder", images=query)
        dino = self._run("dino_features", images=query)["dino_feat"]
        p = self._run("prior", query_dino=dino, support_dino=sup.dino, support_masks=sup.masks)
        two = lambda t: torch.cat([t, t])  # noqa: E731
        m = self._run("memory_encoder", feat=two(f["feat"]), feat_s0=two(f["feat_s0"]), feat_s1=two(f["feat_s1"]),
                      mask=torch.cat([p["prior_fg"], p["prior_ae"]]))
        qm = self._run("refinement", support_memory=sup.memory, query_fg_memory=m["memory"][:b],
                       query_ae_memory=m["memory"][b:], support_masks=sup.masks, prior_fg=p["prior_fg"],
                       prior_ae=p["prior_ae"])["query_memory"]
        return self._run("decoder", feat=f["feat"], feat_s0=f["feat_s0"], feat_s1=f["feat_s1"],
                         support_memory=sup.memory, support_obj_ptr=sup.obj_ptr, query_memory=qm,
                         query_obj_ptr=m["obj_ptr"][b:], support_masks=sup.masks)["logits"]

    def segment(self, query: torch.Tensor, supports: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """One episode (or B of them) -> mask logits (B, 1, S, S); logits > 0 is the mask."""
        masks = check_episode(query, supports, masks, self.cfg.image_size)
        dev = self.device
        return self.segment_query(query.to(dev), self.encode_supports(supports.to(dev), masks.to(dev)))

    def with_supports(self, supports: torch.Tensor, masks: torch.Tensor) -> SupportSession:
        """Encode a support set once (DINOv2 features, memories, pointers) for many queries."""
        masks = check_episode(supports[:, 0], supports, masks, self.cfg.image_size)
        return SupportSession(self, self.encode_supports(supports.to(self.device), masks.to(self.device)))


class SupportSession:
    """A support set encoded once: `segment(query)` runs only the query side."""

    def __init__(self, episode: Episode, support: EpisodeSupport):
        self.episode, self.support = episode, support

    def segment(self, query: torch.Tensor) -> torch.Tensor:
        """query (Bq, 3, S, S) -> logits (Bq, 1, S, S); Bq may differ from the support batch if that is 1."""
        sup, bs, bq = self.support, self.support.memory.shape[0], query.shape[0]
        check_images("query", query, self.episode.cfg.image_size, (bq if bs == 1 else bs,))
        if bs == 1 and bq > 1:
            sup = sup.expand(bq)
        return self.episode.segment_query(query.to(self.episode.device), sup)


class OnnxEpisode(Episode):
    """The episode over the ONNX graphs of `engine_dir` (`fssam export`), one ONNX Runtime session per stage.

    `expect`: refuse graphs exported for another config. `device`: where tensors live ("cuda"
    uses the CUDA / TensorRT execution providers when installed). `threads`: intra-op threads.
    `emulate_bf16`: run bf16 graphs (made for TensorRT) as their fp32 emulation, for accuracy checks.
    """

    def __init__(self, engine_dir: str | Path, expect: FSSAMConfig | None = None, device="cpu",
                 threads: int | None = None, emulate_bf16: bool = False):
        self.engine_dir = Path(engine_dir)
        self.manifest = read_manifest(self.engine_dir, expect)
        precision = self.manifest.get("precision", "fp32")
        if precision == "bf16" and not emulate_bf16:
            raise EngineError(f"{self.engine_dir}: bf16 graphs are for TensorRT (`fssam build --format tensorrt "
                              "--precision bf16`); ONNX Runtime has no bf16 CPU kernels. Check their accuracy with "
                              "`fssam verify` (it runs them emulated); export fp32 or fp16 graphs for ONNX Runtime")
        cfg = FSSAMConfig.from_dict(self.manifest["config"])
        runners = {}
        for name, spec in STAGE_SPECS.items():
            shape_fn = lambda b, spec=spec: {t.name: t.concrete(cfg, b, cfg.shots) for t in spec.outputs}  # noqa: E731
            runners[name] = OnnxRuntimeRunner(self.engine_dir / self.manifest["stages"][name]["file"], spec,
                                              shape_fn, device, threads, precision)
        super().__init__(runners, cfg, device)
