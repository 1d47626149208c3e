"""The episode in PyTorch: the stages composed, with the support side separable.

It calls the stage modules with the same tensors, in the same order, as the runtime's `Episode`
calls exported graphs (`runtime.episode`); `tests/runtime` checks that both give the same logits.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import load_weights
from .config import FSSAMConfig
from .fssam import FSSAMWeights, Stages, build_stages, random_weights
from .validate import check_episode, check_images

RANDOM_WEIGHTS_WARNING = (
    "FSSAM is running with RANDOM weights (no checkpoint given): fine for export and speed "
    "work, but its masks mean nothing"
)


@dataclass
class SupportFeatures:
    """Everything the query side needs from a support set (B, K shots); reusable."""

    dino: torch.Tensor  # (B, K, Cd, g, g) DINOv2 features of the supports
    memory: torch.Tensor  # (B, K, Cm, h, w) support memories
    obj_ptr: torch.Tensor  # (B, K, C) support object pointers
    masks: torch.Tensor  # (B, K, S, S) support masks in [0, 1]


class Pipeline(nn.Module):
    """FSSAM inference: `segment(query, supports, support_masks) -> logits (B, 1, S, S)`.

    query (B, 3, S, S) and supports (B, K, 3, S, S) are RGB in 0..255; support masks
    (B, K, S, S) hold {0, 1} (255 = ignore, treated as 0) or soft values in [0, 1].
    """

    def __init__(self, weights: FSSAMWeights, attention_backend: str = "auto", random: bool = False):
        super().__init__()
        self.cfg: FSSAMConfig = weights.cfg
        self.weights = weights
        self.random_weights = random
        self.stages: Stages = build_stages(weights, attention_backend)
        self.stage_modules = nn.ModuleDict(self.stages.modules())

    @classmethod
    def from_config(cls, cfg: FSSAMConfig, checkpoint=None, sam2_checkpoint=None, dino_checkpoint=None,
                    seed: int = 0, device: str | torch.device = "cpu", attention_backend: str = "auto") -> Pipeline:
        """Build the architecture of `cfg`, load weights (or draw them from `seed`)."""
        random = checkpoint is None and sam2_checkpoint is None and dino_checkpoint is None
        weights = random_weights(cfg, seed)
        if random:
            warnings.warn(RANDOM_WEIGHTS_WARNING, stacklevel=2)
        else:
            load_weights(weights, checkpoint, sam2_checkpoint, dino_checkpoint)
        return cls(weights, attention_backend, random).to(device).eval()

    @property
    def device(self) -> torch.device:
        return next(self.weights.parameters()).device

    @torch.inference_mode()
    def encode_supports(self, supports: torch.Tensor, support_masks: torch.Tensor) -> SupportFeatures:
        """Support side of an episode: supports (B, K, 3, S, S), masks (B, K, S, S)."""
        s = self.stages
        b, k = supports.shape[:2]
        flat = supports.flatten(0, 1)  # (B*K, 3, S, S)
        f0, f1, feat = s.image_encoder(flat)
        dino = s.dino_features(flat)  # (B*K, Cd, g, g)
        memory, ptr = s.memory_encoder(feat, f0, f1, support_masks.reshape(b * k, 1, *support_masks.shape[-2:]))
        return SupportFeatures(dino.reshape(b, k, *dino.shape[1:]), memory.reshape(b, k, *memory.shape[1:]),
                               ptr.reshape(b, k, -1), support_masks)

    @torch.inference_mode()
    def segment_query(self, query: torch.Tensor, support: SupportFeatures) -> torch.Tensor:
        """Query side of an episode -> logits (B, 1, S, S)."""
        s = self.stages
        b = query.shape[0]
        f0, f1, feat = s.image_encoder(query)
        prior_fg, prior_ae = s.prior(s.dino_features(query), support.dino, support.masks)
        mem, ptr = s.memory_encoder(
            torch.cat([feat, feat]), torch.cat([f0, f0]), torch.cat([f1, f1]), torch.cat([prior_fg, prior_ae])
        )
        fg_mem, ae_mem, ae_ptr = mem[:b], mem[b:], ptr[b:]
        ae_mem = s.refinement(support.memory, fg_mem, ae_mem, support.masks, prior_fg, prior_ae)
        return s.decoder(feat, f0, f1, support.memory, support.obj_ptr, ae_mem, ae_ptr, support.masks)

    def segment(self, query: torch.Tensor, supports: torch.Tensor, support_masks: torch.Tensor) -> torch.Tensor:
        """One episode (or B of them) -> mask logits (B, 1, S, S); sigmoid >= 0.5 is the mask."""
        masks = check_episode(query, supports, support_masks, self.cfg.image_size)
        return self.segment_query(query, self.encode_supports(supports, masks))

    def with_supports(self, supports: torch.Tensor, support_masks: torch.Tensor) -> SupportSession:
        """Encode a support set once; `session.segment(query)` runs only the query side."""
        masks = check_episode(supports[:, 0], supports, support_masks, self.cfg.image_size)
        return SupportSession(self, self.encode_supports(supports, masks))

    forward = segment


class SupportSession:
    """A support set encoded once, for segmenting many queries against it."""

    def __init__(self, pipeline: Pipeline, support: SupportFeatures):
        self.pipeline = pipeline
        self.support = support

    def segment(self, query: torch.Tensor) -> torch.Tensor:
        """query (Bq, 3, S, S) -> logits (Bq, 1, S, S); Bq may differ from the support batch if it is 1."""
        check_images("query", query, self.pipeline.cfg.image_size, (query.shape[0],))
        support = self.support
        bs, bq = support.memory.shape[0], query.shape[0]
        if bs == 1 and bq > 1:
            support = SupportFeatures(*(t.expand(bq, *t.shape[1:]) for t in support.__dict__.values()))
        return self.pipeline.segment_query(query, support)
