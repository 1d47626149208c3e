"""DINOv2 through timm, run the way FSSAM runs the original DINOv2 at 560 px.

timm builds the architecture (`vit_*_patch14_dinov2`: LayerScale, no registers) and
converts the original DINOv2 (torch hub) keys. The forward below is DINOv2's own
`get_intermediate_layers(..., reshape=True)[-1]`: its position grid (37 x 37) is
resampled with DINOv2's bicubic `interpolate_pos_encoding` (scale factor
(40 + 0.1) / 37, no antialias), which differs from timm's resampling. For a fixed
input size that is a constant, computed here after every weight load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fssam_deploy.model.config import DINO_INPUT_SIZE, DINO_MODELS, FSSAMConfig

INTERPOLATE_OFFSET = 0.1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_dinov2_vit(name: str) -> nn.Module:
    """The timm ViT of a DINOv2 hub model, random weights, at its native 518 px."""
    import timm

    arch = DINO_MODELS[name][0]
    return timm.create_model(arch, pretrained=False, img_size=518, num_classes=0).eval()


def dinov2_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """DINOv2's `interpolate_pos_encoding` for a square input of `grid` patches per side."""
    n = pos_embed.shape[1] - 1
    m = int(round(n**0.5))
    if m == grid:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1].float(), pos_embed[:, 1:].float()
    scale = float(grid + INTERPOLATE_OFFSET) / m
    patch_pos = F.interpolate(
        patch_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2),
        scale_factor=(scale, scale),
        mode="bicubic",
        antialias=False,
    )
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return torch.cat([cls_pos, patch_pos], dim=1).to(pos_embed.dtype)


class DinoEncoder(nn.Module):
    """Images (B, 3, S, S), 0..255 -> DINOv2 last-layer patch features (B, C, 40, 40)."""

    def __init__(self, cfg: FSSAMConfig, vit: nn.Module | None = None):
        super().__init__()
        self.vit = vit if vit is not None else build_dinov2_vit(cfg.dino)
        self.grid = DINO_INPUT_SIZE // 14
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.register_buffer("pos_embed", dinov2_pos_embed(self.vit.pos_embed.detach(), self.grid), persistent=False)
        self.vit.register_load_state_dict_post_hook(self._refresh_pos_embed)

    def _refresh_pos_embed(self, *_args) -> None:
        with torch.no_grad():
            new = dinov2_pos_embed(self.vit.pos_embed.detach(), self.grid)
            self.pos_embed = new.to(self.pos_embed.device, self.pos_embed.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = (DINO_INPUT_SIZE, DINO_INPUT_SIZE)
        x = F.interpolate(images, size=size, mode="bilinear", align_corners=True)
        x = (x - self.mean) / self.std
        x = self.vit.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, 1600, C)
        cls = self.vit.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for blk in self.vit.blocks:
            x = blk(x)
        x = self.vit.norm(x)[:, 1:]  # (B, 1600, C)
        return x.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)
