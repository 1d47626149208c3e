"""Build SAM 2 (the `sam2` package from PyPI) for FSSAM, without weights."""

from __future__ import annotations

import torch

from fssam_deploy.model.config import FSSAMConfig


def sam2_overrides(cfg: FSSAMConfig) -> list[str]:
    """Hydra overrides that turn SAM 2.0's config into the one FSSAM trained with.

    FSSAM builds `build_sam2_video_predictor` with its post-processing overrides, at
    `image_size` (512 by default) with RoPE tables for the stride-16 grid.
    """
    g = cfg.feat_size
    ma = "model.memory_attention.layer"
    return [
        f"++model.image_size={cfg.image_size}",
        f"++{ma}.self_attention.feat_sizes=[{g},{g}]",
        f"++{ma}.cross_attention.feat_sizes=[{g},{g}]",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
        "++model.binarize_mask_from_pts_for_mem_enc=true",
        "++model.compile_image_encoder=false",
    ]


def build_sam2_model(cfg: FSSAMConfig) -> torch.nn.Module:
    """A `SAM2Base` with random weights, in eval mode, on the CPU."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if not GlobalHydra.instance().is_initialized():
        initialize_config_module("sam2", version_base="1.2")
    conf = compose(config_name=f"configs/sam2/{cfg.sam2_config}.yaml", overrides=sam2_overrides(cfg))
    OmegaConf.resolve(conf)
    model = instantiate(conf.model, _recursive_=True)
    return model.eval()
