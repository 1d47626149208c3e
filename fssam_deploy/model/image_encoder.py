"""Stage 2: the SAM 2 image encoder (Hiera trunk + FPN neck + the decoder's conv_s0/s1)."""

from __future__ import annotations

import torch
from torch import nn

from fssam_deploy.model.dinov2 import IMAGENET_MEAN, IMAGENET_STD


class ImageEncoder(nn.Module):
    """images (B, 3, S, S), RGB 0..255 ->
    feat_s0 (B, 32, S/4, S/4), feat_s1 (B, 64, S/8, S/8), feat (B, 256, S/16, S/16).

    As `SAM2Base.forward_image` after SAM 2's `x / 255`, mean/std normalisation; levels 0
    and 1 go through the mask decoder's `conv_s0` / `conv_s1`. The position encodings
    are constants of the grid size and live in the stages that use them.
    """

    def __init__(self, sam2: nn.Module):
        super().__init__()
        self.encoder = sam2.image_encoder
        self.conv_s0 = sam2.sam_mask_decoder.conv_s0
        self.conv_s1 = sam2.sam_mask_decoder.conv_s1
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = (images / 255.0 - self.mean) / self.std
        fpn = self.encoder(x)["backbone_fpn"]
        return self.conv_s0(fpn[0]), self.conv_s1(fpn[1]), fpn[2]
