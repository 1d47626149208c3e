"""The episode in PyTorch: `Pipeline` is the one `episode.Episode` over the PyTorch stage modules.

It is an `nn.Module` too (`.to(device)`, `.stage_modules`), built from a config and a checkpoint (or
random weights); every other backend runs the same Episode over its own runners.
"""

from __future__ import annotations

from torch import nn

from fssam_deploy.backends.pytorch import torch_runners
from fssam_deploy.episode import Episode, SupportFeatures, SupportSession
from fssam_deploy.model.checkpoint import RANDOM_WEIGHTS_WARNING, make_weights
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.model.fssam import FSSAMWeights, Stages, build_stages

__all__ = ["RANDOM_WEIGHTS_WARNING", "Pipeline", "SupportFeatures", "SupportSession"]


class Pipeline(nn.Module, Episode):
    """FSSAM inference: `segment(query, supports, support_masks) -> logits (B, 1, S, S)`.

    query (B, 3, S, S) and supports (B, K, 3, S, S) are RGB in 0..255; support masks
    (B, K, S, S) hold {0, 1} (255 = ignore, treated as 0) or soft values in [0, 1].
    `with_supports(supports, masks)` encodes a support set once; `encode_supports` / `segment_query`
    are the two sides of an episode.
    """

    def __init__(self, weights: FSSAMWeights, attention_backend: str = "auto", random: bool = False):
        nn.Module.__init__(self)
        self.weights = weights
        self.random_weights = random
        self.stages: Stages = build_stages(weights, attention_backend)
        self.stage_modules = nn.ModuleDict(self.stages.modules())
        Episode.__init__(self, torch_runners(self.stages, weights.cfg), weights.cfg)
        self.name = "torch"

    @classmethod
    def from_config(cls, cfg: FSSAMConfig, checkpoint=None, sam2_checkpoint=None, dino_checkpoint=None,
                    seed: int = 0, device="cpu", attention_backend: str = "auto") -> Pipeline:
        """Build the architecture of `cfg`, load weights (or draw them from `seed`, with a warning)."""
        random = checkpoint is None and sam2_checkpoint is None and dino_checkpoint is None
        weights = make_weights(cfg, checkpoint, sam2_checkpoint, dino_checkpoint, seed)
        return cls(weights, attention_backend, random).to(device).eval()

    @property
    def device(self):
        return next(self.weights.parameters()).device

    forward = Episode.segment
