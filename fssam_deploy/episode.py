"""The one orchestration of an FSSAM episode, stage by stage, over any set of runners.

`Episode` composes the stages of `stages.STAGE_SPECS`; it knows nothing of the backend. `model.Pipeline`
is an Episode over the PyTorch stage modules; every backend of `backends/` loads an Episode over its own
runners (ONNX Runtime sessions, AOTInductor packages, OpenVINO models, TensorRT engines).

Support side (once per support set): image_encoder, dino_features, memory_encoder.
Query side: image_encoder, dino_features, prior, memory_encoder, refinement, decoder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fssam_deploy.backends.base import Runner
from fssam_deploy.errors import EngineError
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.model.validate import check_episode, check_images
from fssam_deploy.stages import STAGE_SPECS


def run_stage(runner: Runner, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """runner.infer, in chunks of the graph's static batch when the feed's batch differs from it: a last chunk
    (or a whole batch) smaller than the static one is padded with copies of its last item, whose outputs are
    dropped. Every stage's inputs and outputs lead with the batch axis (B, or M for the memory encoder)."""
    first = runner.spec.input_names[0]
    static = runner.input_shapes[first][0]
    batch = feed[first].shape[0]
    if static is None or static == batch:
        return runner.infer(feed)
    parts = []
    for i in range(0, batch, static):
        chunk = {k: v[i : i + static] for k, v in feed.items()}
        n = chunk[first].shape[0]
        if n < static:
            chunk = {k: torch.cat([v, v[-1:].expand(static - n, *v.shape[1:])]) for k, v in chunk.items()}
        parts.append({k: v[:n] for k, v in runner.infer(chunk).items()})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@dataclass
class SupportFeatures:
    """Everything the query side needs from a support set (B episodes, K shots); reusable for any query."""

    dino: torch.Tensor  # (B, K, Cd, g, g) DINOv2 features of the supports
    memory: torch.Tensor  # (B, K, Cm, h, w) support memories
    obj_ptr: torch.Tensor  # (B, K, C) support object pointers
    masks: torch.Tensor  # (B, K, S, S) support masks in [0, 1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def expand(self, batch: int) -> SupportFeatures:
        """One support set (B = 1) shared by `batch` queries (views, no copies)."""
        return SupportFeatures(**{k: t.expand(batch, *t.shape[1:]) for k, t in self.tensors().items()})


class Episode:
    """`segment(query, supports, masks) -> logits (B, 1, S, S)` over one runner per stage.

    `runners` maps every name of `STAGE_SPECS` to an object with the `Runner` contract (`spec`,
    `input_shapes`, `infer`); they are activated here and released by `close()`. Inputs are moved to
    `device`, where the runners keep their outputs. Inside `with episode.timing() as times:` each stage's
    seconds are summed into `times` (the device is synchronised after each stage); outside, nothing is
    timed or synchronised. A batch other than a runner's static one runs in chunks of it (`run_stage`).

    `name` (the registry's backend name), `settings` (what the backend was built with), `manifest` (its
    artifact folder's, if any) describe it; `owned_dirs` are temporary folders removed by `close()`.
    """

    def __init__(self, runners: dict[str, Runner], cfg: FSSAMConfig, device: str | torch.device = "cpu"):
        missing = [name for name in STAGE_SPECS if name not in runners]
        if missing:
            raise EngineError(f"episode: no runner for stages {missing}; every stage of STAGE_SPECS "
                              f"({list(STAGE_SPECS)}) needs one (got {sorted(runners)})")
        self.runners = runners
        self.cfg = cfg
        self._device = torch.device(device)
        self.stage_times: dict[str, float] | None = None
        self.stage_flops: dict[str, int] | None = None
        self.name = "episode"
        self.settings: dict = {}
        self.manifest = None
        self.owned_dirs: list = []
        for runner in self.runners.values():
            runner.activate()

    @property
    def device(self) -> torch.device:
        return self._device

    def fixed_shots(self) -> int | None:
        """The shot count the runners were built for (a "K" axis fixed in an input shape), or None: any."""
        for name, runner in getattr(self, "runners", {}).items():
            spec = STAGE_SPECS.get(name)
            for t in spec.inputs if spec is not None else ():
                shape = getattr(runner, "input_shapes", {}).get(t.name)
                if "K" in t.shape and shape is not None and shape[t.shape.index("K")] is not None:
                    return int(shape[t.shape.index("K")])
        return None

    def close(self) -> None:
        """Release every runner (sessions, packages, engines) and the temporary folders this episode owns."""
        for runner in self.runners.values():
            runner.deactivate()
        while self.owned_dirs:
            self.owned_dirs.pop().cleanup()

    def __enter__(self) -> Episode:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def timing(self) -> Iterator[dict[str, float]]:
        """Sum each stage's seconds (synchronised) into the yielded dict while inside."""
        self.stage_times = {}
        try:
            yield self.stage_times
        finally:
            self.stage_times = None

    @contextlib.contextmanager
    def counting_flops(self) -> Iterator[dict[str, int]]:
        """Sum each stage's FLOPs (matmul, convolution, attention) into the yielded dict while inside; only
        stages that run PyTorch ops (the torch backends) count anything."""
        self.stage_flops = {}
        try:
            yield self.stage_flops
        finally:
            self.stage_flops = None

    def _run(self, name: str, **feed: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.stage_flops is not None:
            from fssam_deploy.bench.flops import flop_counter_mode

            with flop_counter_mode() as counter:
                out = run_stage(self.runners[name], feed)
            self.stage_flops[name] = self.stage_flops.get(name, 0) + counter.get_total_flops()
            return out
        times = self.stage_times
        if times is None or (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return run_stage(self.runners[name], feed)  # untimed (or being recorded into a CUDA graph)
        t0 = time.perf_counter()
        out = run_stage(self.runners[name], feed)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # a stage's time is its kernels' time
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0
        return out

    @torch.inference_mode()
    def encode_supports(self, supports: torch.Tensor, masks: torch.Tensor) -> SupportFeatures:
        """Support side: supports (B, K, 3, S, S) and cleaned masks (B, K, S, S), on the device."""
        b, k = supports.shape[:2]
        flat = supports.flatten(0, 1)  # (B*K, 3, S, S)
        f = self._run("image_encoder", images=flat)
        dino = self._run("dino_features", images=flat)["dino_feat"]  # (B*K, Cd, g, g)
        m = self._run("memory_encoder", feat=f["feat"], feat_s0=f["feat_s0"], feat_s1=f["feat_s1"],
                      mask=masks.reshape(b * k, 1, *masks.shape[-2:]))
        return SupportFeatures(dino=dino.reshape(b, k, *dino.shape[1:]),
                               memory=m["memory"].reshape(b, k, *m["memory"].shape[1:]),
                               obj_ptr=m["obj_ptr"].reshape(b, k, -1), masks=masks)

    @torch.inference_mode()
    def segment_query(self, query: torch.Tensor, sup: SupportFeatures) -> torch.Tensor:
        """Query side: query (B, 3, S, S) on the device -> float32 logits (B, 1, S, S)."""
        b = query.shape[0]
        f = self._run("image_encoder", images=query)
        dino = self._run("dino_features", images=query)["dino_feat"]
        p = self._run("prior", query_dino=dino, support_dino=sup.dino, support_masks=sup.masks)
        two = lambda t: torch.cat([t, t])  # noqa: E731  (fg and ae priors share one memory-encoder call)
        m = self._run("memory_encoder", feat=two(f["feat"]), feat_s0=two(f["feat_s0"]), feat_s1=two(f["feat_s1"]),
                      mask=torch.cat([p["prior_fg"], p["prior_ae"]]))
        qm = self._run("refinement", support_memory=sup.memory, query_fg_memory=m["memory"][:b],
                       query_ae_memory=m["memory"][b:], support_masks=sup.masks, prior_fg=p["prior_fg"],
                       prior_ae=p["prior_ae"])["query_memory"]
        logits = self._run("decoder", feat=f["feat"], feat_s0=f["feat_s0"], feat_s1=f["feat_s1"],
                           support_memory=sup.memory, support_obj_ptr=sup.obj_ptr, query_memory=qm,
                           query_obj_ptr=m["obj_ptr"][b:], support_masks=sup.masks)["logits"]
        return logits.float()  # half-precision backends return half logits

    def segment(self, query: torch.Tensor, supports: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """One episode (or B of them) -> mask logits (B, 1, S, S); sigmoid >= 0.5 is the mask."""
        masks = check_episode(query, supports, masks, self.cfg.image_size)
        dev = self.device
        return self.segment_query(query.to(dev), self.encode_supports(supports.to(dev), masks.to(dev)))

    def with_supports(self, supports: torch.Tensor, masks: torch.Tensor) -> SupportSession:
        """Encode a support set once (DINOv2 features, memories, pointers); `session.segment(query)` runs only
        the query side."""
        masks = check_episode(supports[:, 0], supports, masks, self.cfg.image_size)
        return SupportSession(self, self.encode_supports(supports.to(self.device), masks.to(self.device)))


class SupportSession:
    """A support set encoded once: `segment(query)` runs only the query side."""

    def __init__(self, episode: Episode, support: SupportFeatures):
        self.episode, self.support = episode, support

    def segment(self, query: torch.Tensor) -> torch.Tensor:
        """query (Bq, 3, S, S) -> logits (Bq, 1, S, S); Bq may differ from the support batch if that is 1."""
        sup, bs, bq = self.support, self.support.memory.shape[0], query.shape[0]
        check_images("query", query, self.episode.cfg.image_size, (bq if bs == 1 else bs,))
        if bs == 1 and bq > 1:
            sup = sup.expand(bq)
        return self.episode.segment_query(query.to(self.episode.device), sup)
