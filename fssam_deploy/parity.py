"""How far a backend's logits are from a reference's: mask IoU (logits > 0, i.e. sigmoid >= 0.5) and max error."""

from __future__ import annotations

import torch


def mask_iou(logits: torch.Tensor, ref: torch.Tensor) -> float:
    """IoU of the masks `logits > 0` and `ref > 0` over every pixel of the batch (1.0 when both are empty)."""
    a, b = logits.float().cpu() > 0, ref.float().cpu() > 0
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def parity(logits: torch.Tensor, ref: torch.Tensor) -> dict:
    """{"mask_iou", "max_abs_logit_err", "ref_abs_max"} of `logits` against `ref` (same shape)."""
    err = (logits.float().cpu() - ref.float().cpu()).abs().max().item()
    return {"mask_iou": mask_iou(logits, ref), "max_abs_logit_err": err, "ref_abs_max": ref.abs().max().item()}
