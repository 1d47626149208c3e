"""The FSSAM weights (SAM 2 + DINOv2) and the six stages built on them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.model.decoder import MemoryDecoder
from fssam_deploy.model.dinov2 import DinoEncoder, build_dinov2_vit
from fssam_deploy.model.image_encoder import ImageEncoder
from fssam_deploy.model.memory_encoder import MemoryEncoder
from fssam_deploy.model.prior import PriorGenerator
from fssam_deploy.model.refinement import MemoryRefinement
from fssam_deploy.model.sam2_build import build_sam2_model
from fssam_deploy.model.sam_heads import SamHeads


class FSSAMWeights(nn.Module):
    """Holds the parameters under FSSAM's checkpoint names: `sam2.*` and `dino.*`."""

    def __init__(self, cfg: FSSAMConfig):
        super().__init__()
        self.cfg = cfg
        self.sam2 = build_sam2_model(cfg)
        self.dino = build_dinov2_vit(cfg.dino)


def random_weights(cfg: FSSAMConfig, seed: int = 0) -> FSSAMWeights:
    """Build the real architectures with weights drawn from `seed` (their own init)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        weights = FSSAMWeights(cfg)
        # SAM 2 leaves some parameters at zero (e.g. no_obj_ptr, tpos enc): draw them too,
        # so that every path of the computation is exercised.
        for p in weights.sam2.parameters():
            if p.dim() >= 1 and torch.count_nonzero(p) == 0:
                with torch.no_grad():
                    p.normal_(0.0, 0.02)
    return weights.eval()


@dataclass
class Stages:
    """The stages of `stages.STAGE_SPECS` (same names, same order): tensor-in tensor-out
    modules sharing one set of weights. DINOv2 (`dino_features`) is a stage of its own, so that
    a support set's features are computed once; `prior` takes them."""

    image_encoder: ImageEncoder
    dino_features: DinoEncoder
    prior: PriorGenerator
    memory_encoder: MemoryEncoder
    refinement: MemoryRefinement
    decoder: MemoryDecoder

    def modules(self) -> dict[str, nn.Module]:
        return dict(self.__dict__)


def build_stages(weights: FSSAMWeights, attention_backend: str = "auto") -> Stages:
    cfg = weights.cfg
    heads = SamHeads(weights.sam2)
    return Stages(
        image_encoder=ImageEncoder(weights.sam2).eval(),
        dino_features=DinoEncoder(cfg, weights.dino).eval(),
        prior=PriorGenerator(cfg).eval(),
        memory_encoder=MemoryEncoder(weights.sam2, heads, cfg.memory_bf16_round).eval(),
        refinement=MemoryRefinement(cfg.num_refine, cfg.refine).eval(),
        decoder=MemoryDecoder(weights.sam2, heads, cfg.feat_size, attention_backend).eval(),
    )
