"""Stage 5: support-calibrated memory attention + SAM 2 mask decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fssam_deploy.model.memory_attention import CalibratedMemoryAttention
from fssam_deploy.model.sam_heads import SamHeads


class MemoryDecoder(nn.Module):
    """Inputs
      feat (B, 256, h, w), feat_s0 (B, 32, 4h, 4w), feat_s1 (B, 64, 2h, 2w): query features
      sup_mem (B, K, 64, h, w), sup_ptr (B, K, 256): support memories and object pointers
      qry_mem (B, 64, h, w), qry_ptr (B, 256): refined query memory, its (prior_ae) pointer
      sup_masks (B, K, S, S): support masks in [0, 1]
    Output: mask logits (B, 1, S, S).

    Memory tokens: K support frames then the query frame (N tokens each, sine position
    encoding + temporal encoding `maskmem_tpos_enc[num_maskmem - 1]`), then the (K+1)*4
    pointer tokens (each 256-d pointer split into 4 tokens of 64, zero position).
    The reference hands the attention only the first support's mask (FSSAM5s passes
    `s_mask[:, 0]`): that is kept, so the checkpoints behave as they were trained.
    """

    def __init__(self, sam2: nn.Module, heads: SamHeads, feat_size: int, attention_backend: str = "auto"):
        super().__init__()
        self.attention = CalibratedMemoryAttention(sam2.memory_attention, feat_size, attention_backend)
        self.heads = heads
        self.image_pos = sam2.image_encoder.neck.position_encoding
        self.memory_pos = sam2.memory_encoder.position_encoding
        self.maskmem_tpos_enc = sam2.maskmem_tpos_enc
        self.num_maskmem = int(sam2.num_maskmem)
        self.mem_dim = int(sam2.mem_dim)

    def memory_tokens(self, sup_mem, sup_ptr, qry_mem, qry_ptr) -> tuple[torch.Tensor, torch.Tensor]:
        """-> memory (B, (K+1)N + (K+1)*4, Cm), memory_pos of the same shape."""
        b, k, cm, h, w = sup_mem.shape
        frames = torch.cat([sup_mem, qry_mem[:, None]], dim=1).flatten(3).transpose(2, 3)  # (B, K+1, N, Cm)
        pos = self.memory_pos(qry_mem).flatten(2).transpose(1, 2)[:, None]  # (B, 1, N, Cm)
        pos = pos + self.maskmem_tpos_enc[self.num_maskmem - 1].reshape(1, 1, 1, cm)
        pos = pos.expand(b, k + 1, h * w, cm)
        ptrs = torch.cat([sup_ptr, qry_ptr[:, None]], dim=1)  # (B, K+1, C)
        ptrs = ptrs.reshape(b, (k + 1) * (ptrs.shape[-1] // cm), cm)  # (B, (K+1)*4, Cm)
        memory = torch.cat([frames.flatten(1, 2), ptrs], dim=1)
        memory_pos = torch.cat([pos.flatten(1, 2), torch.zeros_like(ptrs)], dim=1)
        return memory, memory_pos

    def forward(self, feat, feat_s0, feat_s1, sup_mem, sup_ptr, qry_mem, qry_ptr, sup_masks) -> torch.Tensor:
        b, c, h, w = feat.shape
        memory, memory_pos = self.memory_tokens(sup_mem, sup_ptr, qry_mem, qry_ptr)
        num_ptr = sup_ptr.shape[1] + 1
        num_ptr *= sup_ptr.shape[-1] // self.mem_dim
        mask = F.interpolate(sup_masks[:, :1].float(), size=(h, w), mode="nearest").flatten(1)  # (B, N)
        curr = feat.flatten(2).transpose(1, 2)  # (B, N, C)
        curr_pos = self.image_pos(feat).flatten(2).transpose(1, 2).to(curr.dtype)
        out = self.attention(curr, curr_pos, memory, memory_pos.to(memory.dtype), mask, num_ptr)
        feat_mem = out.transpose(1, 2).reshape(b, c, h, w)
        return self.heads.best_mask(feat_mem, feat_s0, feat_s1)
