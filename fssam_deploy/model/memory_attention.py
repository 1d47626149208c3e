"""SAM 2's memory attention with FSSAM's support-calibrated cross-attention.

Wraps the parameters of `sam2.modeling.memory_attention.MemoryAttention` (so checkpoints
load unchanged) with a forward that: uses real-arithmetic RoPE, runs every cross-attention
as the calibrated attention of `fssam_deploy.kernels`, and is batch-first throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fssam_deploy.kernels import calibrated_attention, calibration_weights
from fssam_deploy.model.rope import apply_rope, rope_tables


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)  # (B, H, N, Dh)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (B, N, C)


class CalibratedMemoryAttention(nn.Module):
    """curr (B, N, C) query-frame features, curr_pos (B, N, C), memory (B, L, Cm),
    memory_pos (B, L, Cm), mask (B, N) support mask at h x w -> (B, N, C).

    Memory layout: F frames of N spatial tokens, then P pointer tokens (no RoPE).
    Inside every cross-attention, as in the reference (see SPEC.md, 5-shot quirk), memory
    frame 0 is the support block and frame 1 is the calibrated "query memory" block.
    """

    def __init__(self, memory_attention: nn.Module, feat_size: int, backend: str = "auto"):
        super().__init__()
        self.ma = memory_attention
        self.backend = backend
        layer0 = memory_attention.layers[0]
        attn = layer0.cross_attn_image
        dim = attn.internal_dim // attn.num_heads
        theta = 10000.0 if not hasattr(attn, "rope_theta") else attn.rope_theta
        cos, sin = rope_tables(dim, feat_size, feat_size, theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def self_attention(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        q = apply_rope(split_heads(attn.q_proj(x), attn.num_heads), self.rope_cos, self.rope_sin)
        k = apply_rope(split_heads(attn.k_proj(x), attn.num_heads), self.rope_cos, self.rope_sin)
        v = split_heads(attn.v_proj(x), attn.num_heads)
        return attn.out_proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))

    def cross_attention(self, attn, x, keys, values, mask, num_ptr: int) -> torch.Tensor:
        n = x.shape[1]
        q = apply_rope(split_heads(attn.q_proj(x), attn.num_heads), self.rope_cos, self.rope_sin)
        k = split_heads(attn.k_proj(keys), attn.num_heads)  # (B, H, L, Dh)
        v = split_heads(attn.v_proj(values), attn.num_heads)
        n_rope = k.shape[2] - num_ptr
        k = torch.cat([apply_rope(k[:, :, :n_rope], self.rope_cos, self.rope_sin), k[:, :, n_rope:]], dim=2)
        c = calibration_weights(k[:, :, :n], k[:, :, n : 2 * n], mask)  # (B, H, N)
        out = calibrated_attention(q, k, v, c, n, n, backend=self.backend)
        return attn.out_proj(merge_heads(out))

    def forward(self, curr, curr_pos, memory, memory_pos, mask, num_ptr: int) -> torch.Tensor:
        x = curr + 0.1 * curr_pos if self.ma.pos_enc_at_input else curr
        for layer in self.ma.layers:
            t = layer.norm1(x)
            x = x + self.self_attention(layer.self_attn, t)
            t = layer.norm2(x)
            q_in = t + curr_pos if layer.pos_enc_at_cross_attn_queries else t
            keys = memory + memory_pos if layer.pos_enc_at_cross_attn_keys else memory
            x = x + self.cross_attention(layer.cross_attn_image, q_in, keys, memory, mask, num_ptr)
            t = layer.norm3(x)
            x = x + layer.linear2(layer.activation(layer.linear1(t)))
        return self.ma.norm(x)
