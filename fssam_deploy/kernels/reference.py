"""Plain PyTorch support-calibrated attention: the reference every backend is held to.

Shapes (H heads, D head dim):
  q            (B, H, Nq, D)   queries after projection and RoPE
  k, v         (B, H, Nk, D)   keys / values after projection, RoPE, and the averaging of
                               the support block over shots
  c            (B, H, n_qry)   calibration weight of every query-block key, in [0, 1]
Key axis layout: [0, n_sup) support block | [n_sup, n_sup + n_qry) query block | rest
(object-pointer tokens and, in the 5-shot layout, further memory frames): plain keys.

The maths (FSSAM `RoPEAttention.forward(calibrate=True)`):
  L = q k^T / sqrt(D)
  on the query block only:  A = (L - min_row) / (max_row - min_row + eps)
                            L += min(A + c - 1, 0) * 10
  out = softmax(L) v
"""

from __future__ import annotations

import math

import torch

EPS = 1e-7
GAP_EPS = 5e-4
BIAS_SCALE = 10.0


def weighted_gap(feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked average over the last axis: sum(f * m) / (sum(m) + 5e-4).

    feat (..., C, N), mask broadcastable to (..., 1, N) -> (..., C).
    """
    return (feat * mask).sum(-1) / (mask.sum(-1) + GAP_EPS)


def minmax(x: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """(x - min) / (max - min + eps) along `dim`."""
    lo = x.amin(dim, keepdim=True)
    hi = x.amax(dim, keepdim=True)
    return (x - lo) / (hi - lo + eps)


def calibration_weights(k_sup: torch.Tensor, k_qry: torch.Tensor, sup_mask: torch.Tensor) -> torch.Tensor:
    """Cosine of each query-block key to the masked prototype of the support keys, min-maxed.

    k_sup, k_qry (B, H, N, D) post-RoPE keys; sup_mask (B, N) in {0, 1} -> c (B, H, N).
    """
    proto = weighted_gap(k_sup.transpose(-1, -2), sup_mask[:, None, None, :])  # (B, H, D)
    dots = torch.einsum("bhd,bhnd->bhn", proto, k_qry)  # (B, H, N)
    norms = proto.norm(dim=-1, keepdim=True) * k_qry.norm(dim=-1)  # (B, H, N)
    return minmax(dots / (norms + EPS))


def calibrated_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor, n_sup: int, n_qry: int
) -> torch.Tensor:
    """Materialising reference implementation (fp32 maths for any input dtype)."""
    dtype = q.dtype
    q, k, v, c = q.float(), k.float(), v.float(), c.float()
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, Nq, Nk)
    s_sup = logits[..., :n_sup]
    s_qry = logits[..., n_sup : n_sup + n_qry]
    s_rest = logits[..., n_sup + n_qry :]
    bias = torch.clamp(minmax(s_qry) + c[:, :, None, :] - 1.0, max=0.0) * BIAS_SCALE
    probs = torch.softmax(torch.cat([s_sup, s_qry + bias, s_rest], dim=-1), dim=-1)
    return (probs @ v).to(dtype)
