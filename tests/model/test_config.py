from __future__ import annotations

import pytest

from fssam_deploy.errors import ConfigError
from fssam_deploy.model import FSSAMConfig


def test_presets_and_roundtrip():
    cfg = FSSAMConfig.from_name("paper")
    assert (cfg.sam2_config, cfg.dino, cfg.image_size, cfg.num_refine, cfg.refine) == (
        "sam2_hiera_s", "dinov2_vitb14", 512, 3, "v1")
    assert cfg.feat_size == 32 and cfg.dino_dim == 768
    assert FSSAMConfig.from_dict(cfg.to_dict()) == cfg
    assert FSSAMConfig.from_name("tiny", shots=5).shots == 5
    assert FSSAMConfig(image_size=1024).feat_size == 64


@pytest.mark.parametrize("kw, match", [
    (dict(sam2_config="sam2_hiera_x"), "unknown SAM 2 config 'sam2_hiera_x'"),
    (dict(dino="dinov2_vitg14"), "unknown DINOv2 model"),
    (dict(image_size=500), "multiple of 16"),
    (dict(refine="v3"), "refine must be one of"),
    (dict(shots=0), "shots must be >= 1"),
])
def test_bad_configs(kw, match):
    with pytest.raises(ConfigError, match=match):
        FSSAMConfig(**kw)


def test_unknown_preset_and_fields():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        FSSAMConfig.from_name("huge")
    with pytest.raises(ConfigError, match="unknown config fields"):
        FSSAMConfig.from_dict({"sam2_config": "sam2_hiera_s", "bogus": 1})
