"""The episode, stage by stage, over any set of runners (the refinement loop is in its graph)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..export.onnx_export import read_manifest
from ..export.specs import STAGE_SPECS
from ..model.config import FSSAMConfig
from ..model.validate import check_episode
from .onnxruntime_runner import OnnxRuntimeRunner


def run_stage(runner, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """runner.infer, split into the graph's static batch when the feed's batch is larger."""
    first = runner.spec.input_names[0]
    static = runner.input_shapes[first][0]
    batch = feed[first].shape[0]
    if static is None or static == batch:
        return runner.infer(feed)
    parts = [runner.infer({k: v[i : i + static] for k, v in feed.items()}) for i in range(0, batch, static)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@dataclass
class OnnxSupport:
    """Support side kept on the device: raw supports (the prior graph re-reads them), memories, pointers."""

    supports: torch.Tensor
    masks: torch.Tensor
    memory: torch.Tensor
    obj_ptr: torch.Tensor


class OnnxEpisode:
    """`segment(query, supports, masks) -> logits` with one ONNX Runtime session per stage."""

    def __init__(self, engine_dir: str | Path, expect: FSSAMConfig | None = None, device="cpu",
                 threads: int | None = None):
        self.engine_dir = Path(engine_dir)
        self.manifest = read_manifest(self.engine_dir, expect)
        self.cfg = FSSAMConfig.from_dict(self.manifest["config"])
        self.device = torch.device(device)
        self.stage_times: dict[str, float] = {}
        self.runners = {}
        for name, spec in STAGE_SPECS.items():
            shape_fn = lambda b, spec=spec: {t.name: t.concrete(self.cfg, b, self.cfg.shots)  # noqa: E731
                                             for t in spec.outputs}
            r = OnnxRuntimeRunner(self.engine_dir / self.manifest["stages"][name]["file"], spec, shape_fn,
                                  device, threads)
            r.activate()
            self.runners[name] = r

    def _run(self, name: str, **feed) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        out = run_stage(self.runners[name], feed)
        self.stage_times[name] = self.stage_times.get(name, 0.0) + time.perf_counter() - t0
        return out

    def encode_supports(self, supports: torch.Tensor, masks: torch.Tensor) -> OnnxSupport:
        b, k = supports.shape[:2]
        f = self._run("image_encoder", images=supports.flatten(0, 1))
        m = self._run("memory_encoder", feat=f["feat"], feat_s0=f["feat_s0"], feat_s1=f["feat_s1"],
                      mask=masks.reshape(b * k, 1, *masks.shape[-2:]))
        return OnnxSupport(supports, masks, m["memory"].reshape(b, k, *m["memory"].shape[1:]),
                           m["obj_ptr"].reshape(b, k, -1))

    def segment_query(self, query: torch.Tensor, sup: OnnxSupport) -> torch.Tensor:
        b = query.shape[0]
        p = self._run("prior", query=query, supports=sup.supports, support_masks=sup.masks)
        f = self._run("image_encoder", images=query)
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
        masks = check_episode(query, supports, masks, self.cfg.image_size)
        dev = self.device
        return self.segment_query(query.to(dev), self.encode_supports(supports.to(dev), masks.to(dev)))

    def with_supports(self, supports: torch.Tensor, masks: torch.Tensor) -> OnnxSupportSession:
        """Encode a support set once (image features, memories, pointers) for many queries."""
        masks = check_episode(supports[:, 0], supports, masks, self.cfg.image_size)
        return OnnxSupportSession(self, self.encode_supports(supports.to(self.device), masks.to(self.device)))


class OnnxSupportSession:
    def __init__(self, episode: OnnxEpisode, support: OnnxSupport):
        self.episode, self.support = episode, support

    def segment(self, query: torch.Tensor) -> torch.Tensor:
        sup, bq = self.support, query.shape[0]
        if sup.memory.shape[0] == 1 and bq > 1:
            sup = OnnxSupport(*(t.expand(bq, *t.shape[1:]) for t in sup.__dict__.values()))
        return self.episode.segment_query(query.to(self.episode.device), sup)
