"""Checks on tensors passed through the API: shapes, finiteness, mask values."""

from __future__ import annotations

import warnings

import torch

from fssam_deploy.errors import InputError, expect_shape


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise InputError(f"{name}: {bad} NaN/Inf values in a tensor of shape {tuple(t.shape)}")


def check_images(name: str, images: torch.Tensor, size: int, lead: tuple) -> None:
    expect_shape(name, images, (*lead, 3, size, size))
    check_finite(name, images)


def clean_masks(name: str, masks: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Masks in {0, 1, 255} or [0, 1]; 255 (ignore) becomes 0. Warns on empty support masks."""
    expect_shape(name, masks, shape)
    masks = masks.float()
    check_finite(name, masks)
    masks = torch.where(masks == 255, torch.zeros_like(masks), masks)
    if masks.min() < 0 or masks.max() > 1:
        raise InputError(f"{name}: values must be in [0, 1] (255 = ignore); got range "
                         f"[{masks.min().item():g}, {masks.max().item():g}]")
    empty = (masks.flatten(2).amax(-1) <= 0).nonzero().tolist()
    if empty:
        warnings.warn(f"{name}: support mask(s) {empty} (batch, shot) are all background; "
                      "FSSAM runs, but the prototype is zero and the mask is likely empty", stacklevel=3)
    return masks


def check_episode(query, supports, masks, size: int) -> torch.Tensor:
    """Validate an episode; returns the cleaned support masks (B, K, S, S)."""
    if supports.dim() != 5:
        raise InputError(f"supports: expected shape (B, K, 3, {size}, {size}), got {tuple(supports.shape)}")
    b, k = supports.shape[:2]
    check_images("query", query, size, (b,))
    check_images("supports", supports, size, (b, k))
    return clean_masks("support_masks", masks, (b, k, size, size))
