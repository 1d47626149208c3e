"""FSSAM configuration: one frozen dataclass, named presets, and the model tables."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from fssam_deploy.errors import ConfigError

# SAM 2.0 configs that FSSAM uses (sam2 package: configs/sam2/<name>.yaml).
SAM2_CONFIGS = ("sam2_hiera_t", "sam2_hiera_s", "sam2_hiera_b+", "sam2_hiera_l")

# DINOv2 hub name -> (timm architecture, embed dim, depth)
DINO_MODELS = {
    "dinov2_vits14": ("vit_small_patch14_dinov2", 384, 12),
    "dinov2_vitb14": ("vit_base_patch14_dinov2", 768, 12),
    "dinov2_vitl14": ("vit_large_patch14_dinov2", 1024, 24),
}

DINO_INPUT_SIZE = 560  # FSSAM resizes every image to 560 x 560 for DINOv2 (40 x 40 patches)
REFINE_VERSIONS = ("v1", "v2")


@dataclass(frozen=True)
class FSSAMConfig:
    """Everything that fixes the computation of an FSSAM model.

    It is saved beside every exported artifact, and a runtime refuses artifacts
    whose config differs from the one it was asked to run.
    """

    sam2_config: str = "sam2_hiera_s"
    dino: str = "dinov2_vitb14"
    image_size: int = 512
    shots: int = 1
    num_refine: int = 3
    refine: str = "v1"
    # The reference stores memory features in bfloat16 (`maskmem_features.to(torch.bfloat16)`)
    # before refinement and attention. Keep it to reproduce the reference bit for bit.
    memory_bf16_round: bool = True

    def __post_init__(self) -> None:
        if self.sam2_config not in SAM2_CONFIGS:
            raise ConfigError(f"unknown SAM 2 config {self.sam2_config!r}; choose one of {', '.join(SAM2_CONFIGS)}")
        if self.dino not in DINO_MODELS:
            raise ConfigError(f"unknown DINOv2 model {self.dino!r}; choose one of {', '.join(DINO_MODELS)}")
        if self.image_size < 64 or self.image_size % 16:
            raise ConfigError(f"image_size must be a multiple of 16 and >= 64, got {self.image_size}")
        if self.shots < 1:
            raise ConfigError(f"shots must be >= 1, got {self.shots}")
        if self.num_refine < 0:
            raise ConfigError(f"num_refine must be >= 0, got {self.num_refine}")
        if self.refine not in REFINE_VERSIONS:
            raise ConfigError(f"refine must be one of {REFINE_VERSIONS}, got {self.refine!r}")

    # -- derived sizes -------------------------------------------------------------------
    @property
    def feat_size(self) -> int:
        """Side of the stride-16 SAM 2 grid (h = w)."""
        return self.image_size // 16

    @property
    def dino_dim(self) -> int:
        return DINO_MODELS[self.dino][1]

    @property
    def dino_grid(self) -> int:
        return DINO_INPUT_SIZE // 14

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> FSSAMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}; known fields are {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_name(cls, name: str, **overrides) -> FSSAMConfig:
        """A named preset, optionally with some fields replaced."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **changes) -> FSSAMConfig:
        return dataclasses.replace(self, **changes)


PRESETS = {
    # The paper's default: SAM 2 Hiera-S at 512 px, DINOv2 ViT-B/14, 3 refinements (v1).
    "paper": FSSAMConfig(),
    "paper-5shot": FSSAMConfig(shots=5),
    # Small and fast, for tests, the demo and export work.
    "tiny": FSSAMConfig(sam2_config="sam2_hiera_t", dino="dinov2_vits14", image_size=256),
    "tiny-5shot": FSSAMConfig(sam2_config="sam2_hiera_t", dino="dinov2_vits14", image_size=256, shots=5),
}
