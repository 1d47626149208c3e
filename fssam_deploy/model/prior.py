"""The pseudo-prompt generator: prototype priors from DINOv2 features (FSSAM `generate_prior_proto`).

DINOv2 itself is the stage before (`dinov2.DinoEncoder`, stage `dino_features`), so that a
runtime can compute the supports' features once and reuse them for every query.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fssam_deploy.kernels.reference import EPS, minmax, weighted_gap
from fssam_deploy.model.config import FSSAMConfig


def cosine_to_prototype(feat: torch.Tensor, proto: torch.Tensor) -> torch.Tensor:
    """feat (B, C, N), proto (B, C) -> cosine (B, N), eps 1e-7 on the product of norms."""
    dots = torch.einsum("bc,bcn->bn", proto, feat)
    norms = proto.norm(dim=1, keepdim=True) * feat.norm(dim=1)
    return dots / (norms + EPS)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, align_corners=True (FSSAM's resize for masks and priors)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)


class SupportPrototypes(nn.Module):
    """sup_feat (B, K, C, g, g), masks (B, K, S, S) -> fg, bg prototypes (B, K, C)."""

    def forward(self, sup_feat: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, k, c, g, _ = sup_feat.shape
        m = resize(masks.reshape(b * k, 1, *masks.shape[-2:]), g).reshape(b, k, 1, g * g)
        f = sup_feat.reshape(b, k, c, g * g)
        return weighted_gap(f, m), weighted_gap(f, 1.0 - m)


class PrototypePrior(nn.Module):
    """qry_feat (B, C, g, g), fg/bg prototypes (B, K, C) -> prior_fg, prior_ae (B, 1, S, S).

    Per shot: cosine to the FG and BG prototypes, min-max over the g*g locations, bilinear
    up to S; corr = relu(fg - bg) min-maxed at S (per shot: FSSAM5s; with K = 1 this is
    also FSSAM's joint normalisation). prior_fg / prior_ae are the means over shots.
    """

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size = image_size

    def forward(self, qry_feat: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, g, _ = qry_feat.shape
        k = fg.shape[1]
        q = qry_feat.reshape(b, 1, c, g * g).expand(b, k, c, g * g).reshape(b * k, c, g * g)
        fg_sim = minmax(cosine_to_prototype(q, fg.reshape(b * k, c)))  # (B*K, g*g)
        bg_sim = minmax(cosine_to_prototype(q, bg.reshape(b * k, c)))
        fg_map = resize(fg_sim.reshape(b * k, 1, g, g), self.image_size)
        bg_map = resize(bg_sim.reshape(b * k, 1, g, g), self.image_size)
        corr = torch.relu(fg_map - bg_map).flatten(1)  # (B*K, S*S)
        corr = minmax(corr).reshape(b, k, self.image_size, self.image_size)
        fg_map = fg_map.reshape(b, k, self.image_size, self.image_size)
        return fg_map.mean(1, keepdim=True), corr.mean(1, keepdim=True)


class PriorGenerator(nn.Module):
    """query_dino (B, Cd, g, g), support_dino (B, K, Cd, g, g) DINOv2 features, support_masks
    (B, K, S, S) in [0, 1] -> prior_fg, prior_ae (B, 1, S, S) in [0, 1]."""

    def __init__(self, cfg: FSSAMConfig):
        super().__init__()
        self.prototypes = SupportPrototypes()
        self.prior = PrototypePrior(cfg.image_size)

    def forward(self, query_dino: torch.Tensor, support_dino: torch.Tensor, support_masks: torch.Tensor):
        fg, bg = self.prototypes(support_dino, support_masks)  # (B, K, Cd) each
        return self.prior(query_dino, fg, bg)
