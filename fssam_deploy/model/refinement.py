"""Stage 4: iterative memory refinement (FSSAM `mem_refine` / `generate_prior_mem`); no weights."""

from __future__ import annotations

import torch
from torch import nn

from fssam_deploy.kernels.reference import minmax, weighted_gap
from fssam_deploy.model.prior import cosine_to_prototype, resize


def memory_similarity(qry: torch.Tensor, ref: torch.Tensor, ref_mask: torch.Tensor) -> torch.Tensor:
    """sim(Mq, Mref, mref): qry (B, C, N), ref (B, K, C, N), ref_mask (B, K, 1, N) -> (B, N).

    Cosine of each query location to the masked prototype of every reference shot,
    min-maxed per shot, then averaged over shots (FSSAM5s; FSSAM when K = 1).
    """
    b, k, c, n = ref.shape
    proto = weighted_gap(ref, ref_mask).reshape(b * k, c)  # (B*K, C)
    q = qry[:, None].expand(b, k, c, n).reshape(b * k, c, n)
    return minmax(cosine_to_prototype(q, proto)).reshape(b, k, n).mean(1)


class MemoryRefinement(nn.Module):
    """sup_mem (B, K, Cm, h, w), qry_fg_mem, qry_ae_mem (B, Cm, h, w), support masks
    (B, K, S, S), prior_fg, prior_ae (B, 1, S, S) -> refined qry_ae_mem (B, Cm, h, w).

    Masks and priors are resized to h x w (bilinear, align_corners) here.
    """

    def __init__(self, num_refine: int = 3, version: str = "v1"):
        super().__init__()
        self.num_refine = num_refine
        self.version = version

    def forward(self, sup_mem, qry_fg_mem, qry_ae_mem, sup_masks, prior_fg, prior_ae) -> torch.Tensor:
        b, k, cm, h, w = sup_mem.shape
        sup_m = resize(sup_masks.reshape(b * k, 1, *sup_masks.shape[-2:]), h).reshape(b, k, 1, h * w)
        fg = resize(prior_fg, h).reshape(b, h * w)
        ae = resize(prior_ae, h).reshape(b, h * w)
        mf = qry_fg_mem.reshape(b, cm, h * w)
        ma = qry_ae_mem.reshape(b, cm, h * w)
        p_qs = memory_similarity(mf, sup_mem.reshape(b, k, cm, h * w), sup_m)  # once
        for _ in range(self.num_refine):
            ma, ae = self.step(mf, ma, fg, ae, p_qs)
        return ma.reshape(b, cm, h, w)

    def step(self, mf, ma, fg, ae, p_qs) -> tuple[torch.Tensor, torch.Tensor]:
        """One refinement iteration on flattened tensors: mf, ma (B, Cm, N); fg, ae, p_qs (B, N)."""
        p_qq = memory_similarity(mf, ma[:, None], ae[:, None, None])
        p = torch.relu(p_qq + p_qs - 1.0)
        if self.version == "v2":
            p = minmax(p)
        ma = mf * p[:, None] + ma * (1.0 - p[:, None])
        ae = minmax(fg * p + ae * (1.0 - p))
        return ma, ae
