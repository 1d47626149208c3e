"""The int8 recipe's pieces: which nodes stay fp32, calibration data from images or episodes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fssam_deploy.errors import ConfigError, InputError

nncf = pytest.importorskip("nncf")
from fssam_deploy.backends.openvino.quantize import (  # noqa: E402
    WEIGHT_OPS,
    activation_matmuls,
    episode_feeds,
    image_feeds,
    kept_fp32,
)


def _model(folder, stage):
    import openvino as ov

    return ov.Core().read_model(str(folder / f"{stage}.xml"))


def test_fp32_cone_of_the_high_res_features(ov_fp32):
    model = _model(ov_fp32, "image_encoder")
    weights = [n for n in model.get_ops() if n.get_type_name() in WEIGHT_OPS]
    cone = kept_fp32(model, "image_encoder", keep_activation_matmuls=False)
    assert 0 < len(cone) < len(weights)  # Hiera's first stages only, not the whole encoder


def test_attention_stays_fp32(ov_fp32):
    model = _model(ov_fp32, "dino_features")
    attention = activation_matmuls(model)
    assert len(attention) >= 12  # ViT-S/14: one attention per block, 12 blocks
    assert kept_fp32(model, "dino_features", keep_activation_matmuls=False) == []  # no cone in DINOv2
    assert set(attention) <= set(kept_fp32(model, "dino_features", keep_activation_matmuls=True))


def test_image_feeds(tmp_path, tiny_cfg):
    for i in range(3):
        Image.fromarray(np.full((40, 60, 3), 50 * i, np.uint8)).save(tmp_path / f"{i}.png")
    feeds = image_feeds(tmp_path, tiny_cfg, None)
    assert [f["images"].shape for f in feeds] == [(1, 3, 256, 256)] * 3
    assert [f["images"].shape for f in image_feeds(tmp_path, tiny_cfg, 2)] == [(2, 3, 256, 256)]
    with pytest.raises(InputError, match=r"3 images, the IR's static batch needs at least 4"):
        image_feeds(tmp_path, tiny_cfg, 4)


def test_empty_calibration_dir(tmp_path, tiny_cfg):
    with pytest.raises(InputError, match="folder holds no images"):
        image_feeds(tmp_path, tiny_cfg, None)


def test_episode_feeds_record_what_the_episode_feeds(ov_fp32, tiny_cfg):
    feeds = episode_feeds(ov_fp32, tiny_cfg, ("image_encoder", "decoder"), episodes=1, seed=0, threads=2)
    assert len(feeds["image_encoder"]) == 2  # the support, then the query
    assert feeds["image_encoder"][0]["images"].shape == (1, 3, 256, 256)
    assert len(feeds["decoder"]) == 1 and "query_memory" in feeds["decoder"][0]
    with pytest.raises(ConfigError, match="at least one episode"):
        episode_feeds(ov_fp32, tiny_cfg, ("image_encoder",), episodes=0, seed=0, threads=2)
