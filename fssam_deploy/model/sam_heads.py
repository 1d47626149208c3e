"""SAM 2's prompt encoder + mask decoder with no point prompts, as FSSAM calls them.

Mirrors `SAM2Base._forward_sam_heads` of FSSAM's modified SAM 2, which does NOT replace
the low-res masks by NO_OBJ_SCORE when the object score is negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SamHeads(nn.Module):
    """Shared by the memory encoder (pointer from a mask prompt) and the final decoder."""

    def __init__(self, sam2: nn.Module):
        super().__init__()
        self.prompt_encoder = sam2.sam_prompt_encoder
        self.mask_decoder = sam2.sam_mask_decoder
        self.obj_ptr_proj = sam2.obj_ptr_proj
        self.no_obj_ptr = sam2.no_obj_ptr if sam2.pred_obj_scores else None
        self.pred_obj_scores = bool(sam2.pred_obj_scores)
        self.soft_no_obj_ptr = bool(sam2.soft_no_obj_ptr)
        self.fixed_no_obj_ptr = bool(sam2.fixed_no_obj_ptr)
        self.use_multimask_token_for_obj_ptr = bool(sam2.use_multimask_token_for_obj_ptr)
        self.image_size = int(sam2.image_size)

    def decode(self, feat, feat_s0, feat_s1, mask_prompt: torch.Tensor | None, multimask: bool):
        """-> low-res mask logits (B, M, 4h, 4w), ious (B, M), output tokens, object scores."""
        b = feat.shape[0]
        coords = torch.zeros(b, 1, 2, device=feat.device, dtype=feat.dtype)
        labels = -torch.ones(b, 1, dtype=torch.int32, device=feat.device)
        sparse, dense = self.prompt_encoder(points=(coords, labels), boxes=None, masks=mask_prompt)
        return self.mask_decoder(
            image_embeddings=feat,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=False,
            high_res_features=[feat_s0, feat_s1],
        )

    def gate_pointer(self, obj_ptr: torch.Tensor, is_obj: torch.Tensor) -> torch.Tensor:
        """SAM 2's occlusion handling: blend towards the learned `no_obj_ptr`."""
        if not self.pred_obj_scores:
            return obj_ptr
        if self.fixed_no_obj_ptr:
            obj_ptr = is_obj * obj_ptr
        return obj_ptr + (1 - is_obj) * self.no_obj_ptr

    def pointer(self, feat, feat_s0, feat_s1, mask_prompt: torch.Tensor) -> torch.Tensor:
        """Object pointer (B, C) from a dense mask prompt, single-mask output."""
        _, _, tokens, obj_scores = self.decode(feat, feat_s0, feat_s1, mask_prompt, multimask=False)
        obj_ptr = self.obj_ptr_proj(tokens[:, 0])
        if self.pred_obj_scores:
            is_obj = obj_scores.sigmoid() if self.soft_no_obj_ptr else (obj_scores > 0).to(obj_ptr.dtype)
            obj_ptr = self.gate_pointer(obj_ptr, is_obj)
        return obj_ptr

    def best_mask(self, feat, feat_s0, feat_s1) -> torch.Tensor:
        """Multimask output, keep the mask with the highest predicted IoU -> (B, 1, S, S) logits."""
        low_res, ious, _, _ = self.decode(feat, feat_s0, feat_s1, None, multimask=True)
        best = ious.argmax(dim=-1)  # (B,)
        idx = best.view(-1, 1, 1, 1).expand(-1, 1, *low_res.shape[-2:])
        low = torch.gather(low_res.float(), 1, idx)  # (B, 1, 4h, 4w)
        size = (self.image_size, self.image_size)
        return F.interpolate(low, size=size, mode="bilinear", align_corners=False)
