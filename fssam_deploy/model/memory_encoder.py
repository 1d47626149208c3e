"""Stage 3: the pseudo-prompt memory encoder (SAM 2 `_use_mask_as_output` + memory encoder)."""

from __future__ import annotations

import torch
from torch import nn

from fssam_deploy.model.sam_heads import SamHeads

OUT_SCALE, OUT_BIAS = 20.0, -10.0  # mask -> logits, as SAM 2's `_use_mask_as_output`


class MemoryEncoder(nn.Module):
    """feat (M, 256, h, w), feat_s0, feat_s1, mask (M, 1, S, S) in [0, 1] ->
    memory (M, 64, h, w), obj_ptr (M, 256).

    An episode runs it on (support feature, support mask), (query feature, prior_fg) and
    (query feature, prior_ae); the three share weights, so they are one batch of M.
    `bf16_round` reproduces the reference, which stores memory features in bfloat16.
    """

    def __init__(self, sam2: nn.Module, heads: SamHeads, bf16_round: bool = True):
        super().__init__()
        self.heads = heads
        self.mask_downsample = sam2.mask_downsample
        self.memory_encoder = sam2.memory_encoder
        self.sigmoid_scale = float(sam2.sigmoid_scale_for_mem_enc)
        self.sigmoid_bias = float(sam2.sigmoid_bias_for_mem_enc)
        self.bf16_round = bf16_round

    def forward(self, feat, feat_s0, feat_s1, mask) -> tuple[torch.Tensor, torch.Tensor]:
        mask = mask.float()
        high_res = mask * OUT_SCALE + OUT_BIAS
        obj_ptr = self.heads.pointer(feat, feat_s0, feat_s1, self.mask_downsample(mask))
        # the mask decides whether the object is present, not the decoder's score
        is_obj = (mask.flatten(1) > 0).any(dim=1, keepdim=True).to(obj_ptr.dtype)  # (M, 1)
        obj_ptr = self.heads.gate_pointer(obj_ptr, is_obj)
        mask_for_mem = torch.sigmoid(high_res) * self.sigmoid_scale + self.sigmoid_bias
        memory = self.memory_encoder(feat, mask_for_mem, skip_mask_sigmoid=True)["vision_features"]
        if self.bf16_round:
            memory = memory.to(torch.bfloat16).to(feat.dtype)
        return memory, obj_ptr
