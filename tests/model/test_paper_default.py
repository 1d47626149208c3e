"""The paper's default (SAM 2 Hiera-S, DINOv2 ViT-B/14, 512 px) end to end on the CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from fssam_deploy.model import FSSAMConfig, Pipeline, random_weights, save_fssam_checkpoint
from tests.helpers import make_episode


@pytest.mark.slow
def test_paper_default_end_to_end(tmp_path):
    cfg = FSSAMConfig.from_name("paper")
    weights = random_weights(cfg, seed=11)
    save_fssam_checkpoint(weights, tmp_path / "best_1shot.pth", module_prefix=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = Pipeline.from_config(cfg, checkpoint=tmp_path / "best_1shot.pth")
    assert not pipe.random_weights
    q, sx, sy = make_episode(cfg, batch=1, shots=1, seed=2)
    logits = pipe.segment(q, sx, sy)
    assert logits.shape == (1, 1, 512, 512) and torch.isfinite(logits).all()
    st = pipe.stages
    with torch.no_grad():
        f0, f1, feat = st.image_encoder(q)
        assert (f0.shape, f1.shape, feat.shape) == ((1, 32, 128, 128), (1, 64, 64, 64), (1, 256, 32, 32))
        assert st.dino_features(q).shape == (1, 768, 40, 40)
    # 5 shots with the same weights: supports encoded once, then the query side alone
    q5, sx5, sy5 = make_episode(cfg, batch=1, shots=5, seed=3)
    full = pipe.segment(q5, sx5, sy5)
    torch.testing.assert_close(pipe.with_supports(sx5, sy5).segment(q5), full, atol=0, rtol=0)


@pytest.mark.slow
def test_image_size_1024_runs():
    cfg = FSSAMConfig.from_name("tiny", image_size=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = Pipeline.from_config(cfg, seed=0)
    q, sx, sy = make_episode(cfg, batch=1, shots=1, seed=2)
    logits = pipe.segment(q, sx, sy)
    assert logits.shape == (1, 1, 1024, 1024) and torch.isfinite(logits).all()
    assert pipe.stages.decoder.attention.rope_cos.shape == (64 * 64, 128)
