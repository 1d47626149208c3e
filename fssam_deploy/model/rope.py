"""Axial rotary position encoding of SAM 2's memory attention, in real arithmetic.

SAM 2 (`sam2.modeling.position_encoding.apply_rotary_enc`) multiplies complex numbers,
which ONNX cannot express. Here the same rotation is written with cos/sin tables:
pair (2m, 2m+1) of the head dimension of token t is rotated by angle_m(t), where the
first D/4 angles are x(t) * theta_i and the last D/4 are y(t) * theta_i, with
x = t % w, y = t // w and theta_i = base^(-4i/D).
"""

from __future__ import annotations

import torch


def axial_angles(dim: int, end_x: int, end_y: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles (end_x * end_y, dim // 2), matching `compute_axial_cis`."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 4)[: dim // 4].float() / dim))
    t = torch.arange(end_x * end_y, dtype=torch.float32)
    t_x = t % end_x
    t_y = torch.div(t, end_x, rounding_mode="floor")
    return torch.cat([torch.outer(t_x, freqs), torch.outer(t_y, freqs)], dim=-1)


def rope_tables(dim: int, end_x: int, end_y: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (end_x * end_y, dim // 2)."""
    angles = axial_angles(dim, end_x, end_y, theta)
    # torch.polar(1, a) = cos(a) + i sin(a): the same float values as SAM 2's table.
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., N, D) by tables (N0, D/2); N must be a multiple of N0 (tables repeat).

    Computed in fp32 and cast back to x's dtype, as SAM 2 does.
    """
    n, d = x.shape[-2], x.shape[-1]
    reps = n // cos.shape[0]
    if reps != 1:
        cos = cos.repeat(reps, 1)
        sin = sin.repeat(reps, 1)
    xf = x.float().reshape(*x.shape[:-1], d // 2, 2)  # (..., N, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)
