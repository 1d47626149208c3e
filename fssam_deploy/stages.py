"""One StageSpec per stage: the single source of truth for names, shapes and dummy inputs.

Export, runners, verification and tests all read these; no I/O name is typed twice.
Symbolic axes: "B" batch of episodes (or of images, for the image encoder and DINOv2), "M"
batch of memory encodings (B*K + 2B in an episode), "K" shots (fixed per export), "S" image
side, "h" = S / 16, "Cd" DINOv2 width and "g" its patch grid side (560 / 14 = 40).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fssam_deploy.model.config import FSSAMConfig


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints or symbols ("B", "M", "K", "S", "h", "2h", "4h", "Cd", "g")
    bf16_rounded: bool = False  # rounded to bfloat16 and back, as the reference stores it (`parity.StageTolerance`)

    def concrete(self, cfg: FSSAMConfig, batch: int, shots: int) -> tuple[int, ...]:
        h = cfg.feat_size
        table = {"B": batch, "M": batch, "K": shots, "S": cfg.image_size, "h": h, "2h": 2 * h, "4h": 4 * h,
                 "Cd": cfg.dino_dim, "g": cfg.dino_grid}
        return tuple(table[d] if isinstance(d, str) else d for d in self.shape)


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_axis: str = "B"  # the symbol that is dynamic with --batch dynamic

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

    def shapes(self, cfg: FSSAMConfig, batch: int, shots: int) -> dict[str, tuple[int, ...]]:
        return {t.name: t.concrete(cfg, batch, shots) for t in (*self.inputs, *self.outputs)}

    def dummy_inputs(self, cfg: FSSAMConfig, batch: int, shots: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Inputs with realistic ranges: images 0..255, masks {0, 1}, priors [0, 1], DINOv2 features like
        the real ones (`dino_like_features`), other features N(0, 1)."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for t in self.inputs:
            shape = t.concrete(cfg, batch, shots)
            if t.name in IMAGE_INPUTS:
                x = torch.rand(shape, generator=g) * 255
            elif t.name in MASK_INPUTS:
                x = torch.zeros(shape)
                s = shape[-1]
                x[..., s // 4 : s // 2 + s // 8, s // 5 : s // 2] = 1
            elif t.name in PRIOR_INPUTS:
                x = torch.rand(*shape[:-2], 8, 8, generator=g)
                x = torch.nn.functional.interpolate(x.reshape(-1, 1, 8, 8), size=shape[-2:], mode="bilinear")
                x = x.reshape(shape)
            elif t.name in MEMORY_INPUTS:
                x = torch.randn(shape, generator=g).to(torch.bfloat16).float()
            elif t.name in DINO_INPUTS:
                x = dino_like_features(shape, g, object_seed=seed)
            else:
                x = torch.randn(shape, generator=g)
            out[t.name] = x
        return out


def dino_like_features(shape: tuple, g: torch.Generator, object_seed: int = 0) -> torch.Tensor:
    """(..., C, n, n) features like DINOv2's last layer: layer-normed tokens, smooth in space, with one
    "object" direction (drawn from `object_seed`, shared by query and supports) added over the
    region of the dummy support masks, so that the prototype priors have a foreground to find."""
    *lead, c, n, _ = shape
    low = torch.randn(*lead, c, 5, 5, generator=g).reshape(-1, c, 5, 5)
    x = torch.nn.functional.interpolate(low, size=(n, n), mode="bilinear", align_corners=True).reshape(shape)
    x = x + 0.5 * torch.randn(shape, generator=g)
    obj = torch.randn(c, 1, 1, generator=torch.Generator().manual_seed(object_seed))
    x[..., n // 4 : n // 2 + n // 8, n // 5 : n // 2] += 2.0 * obj  # the dummy masks' rectangle at g x g
    x = torch.nn.functional.layer_norm(x.movedim(-3, -1), (c,))  # (..., n, n, C): per-token norm
    return x.movedim(-1, -3).contiguous()


IMAGE_INPUTS = {"images"}
MASK_INPUTS = {"support_masks"}
PRIOR_INPUTS = {"mask", "prior_fg", "prior_ae"}
MEMORY_INPUTS = {"support_memory", "query_fg_memory", "query_ae_memory", "query_memory"}
DINO_INPUTS = {"query_dino", "support_dino"}

T = TensorSpec
IMAGE_ENCODER = StageSpec(
    "image_encoder",
    inputs=(T("images", ("B", 3, "S", "S")),),
    outputs=(T("feat_s0", ("B", 32, "4h", "4h")), T("feat_s1", ("B", 64, "2h", "2h")), T("feat", ("B", 256, "h", "h"))),
)
DINO_FEATURES = StageSpec(
    "dino_features",
    inputs=(T("images", ("B", 3, "S", "S")),),
    outputs=(T("dino_feat", ("B", "Cd", "g", "g")),),
)
PRIOR = StageSpec(
    "prior",
    inputs=(T("query_dino", ("B", "Cd", "g", "g")), T("support_dino", ("B", "K", "Cd", "g", "g")),
            T("support_masks", ("B", "K", "S", "S"))),
    outputs=(T("prior_fg", ("B", 1, "S", "S")), T("prior_ae", ("B", 1, "S", "S"))),
)
MEMORY_ENCODER = StageSpec(
    "memory_encoder",
    inputs=(T("feat", ("M", 256, "h", "h")), T("feat_s0", ("M", 32, "4h", "4h")), T("feat_s1", ("M", 64, "2h", "2h")),
            T("mask", ("M", 1, "S", "S"))),
    outputs=(T("memory", ("M", 64, "h", "h"), bf16_rounded=True), T("obj_ptr", ("M", 256))),
    batch_axis="M",
)
REFINEMENT = StageSpec(
    "refinement",
    inputs=(T("support_memory", ("B", "K", 64, "h", "h")), T("query_fg_memory", ("B", 64, "h", "h")),
            T("query_ae_memory", ("B", 64, "h", "h")), T("support_masks", ("B", "K", "S", "S")),
            T("prior_fg", ("B", 1, "S", "S")), T("prior_ae", ("B", 1, "S", "S"))),
    outputs=(T("query_memory", ("B", 64, "h", "h")),),
)
DECODER = StageSpec(
    "decoder",
    inputs=(T("feat", ("B", 256, "h", "h")), T("feat_s0", ("B", 32, "4h", "4h")), T("feat_s1", ("B", 64, "2h", "2h")),
            T("support_memory", ("B", "K", 64, "h", "h")), T("support_obj_ptr", ("B", "K", 256)),
            T("query_memory", ("B", 64, "h", "h")), T("query_obj_ptr", ("B", 256)),
            T("support_masks", ("B", "K", "S", "S"))),
    outputs=(T("logits", ("B", 1, "S", "S")),),
)

# in execution order: a query's image features and DINOv2 features, its priors, memories, refinement, logits
STAGE_SPECS: dict[str, StageSpec] = {
    s.name: s for s in (IMAGE_ENCODER, DINO_FEATURES, PRIOR, MEMORY_ENCODER, REFINEMENT, DECODER)
}


def stage_module(stages, name: str) -> torch.nn.Module:
    """The PyTorch module a spec describes (`fssam_deploy.model.Stages` attribute of the same name)."""
    return getattr(stages, name)
