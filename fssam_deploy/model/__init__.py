"""FSSAM in PyTorch, stage by stage."""

from fssam_deploy.model.checkpoint import (
    load_weights,
    save_dino_checkpoint,
    save_fssam_checkpoint,
    save_sam2_checkpoint,
)
from fssam_deploy.model.config import PRESETS, FSSAMConfig
from fssam_deploy.model.fssam import FSSAMWeights, Stages, build_stages, random_weights
from fssam_deploy.model.pipeline import Pipeline, SupportFeatures, SupportSession

__all__ = [
    "PRESETS", "FSSAMConfig", "FSSAMWeights", "Pipeline", "Stages", "SupportFeatures", "SupportSession",
    "build_stages", "load_weights", "random_weights", "save_dino_checkpoint", "save_fssam_checkpoint",
    "save_sam2_checkpoint",
]
