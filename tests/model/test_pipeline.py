"""The PyTorch pipeline on the tiny config: shapes, batching, caching, 5-shot, input errors."""

from __future__ import annotations

import pytest
import torch

from fssam_deploy.errors import InputError
from tests.helpers import make_episode


def test_stage_shapes(tiny_pipeline, tiny_cfg):
    s, h = tiny_cfg.image_size, tiny_cfg.feat_size
    st = tiny_pipeline.stages
    q, sx, sy = make_episode(tiny_cfg, batch=2, shots=2)
    with torch.no_grad():
        f0, f1, feat = st.image_encoder(q)
        assert f0.shape == (2, 32, 4 * h, 4 * h) and f1.shape == (2, 64, 2 * h, 2 * h)
        assert feat.shape == (2, 256, h, h)
        cd, g = tiny_cfg.dino_dim, tiny_cfg.dino_grid
        qd = st.dino_features(q)
        sd = st.dino_features(sx.flatten(0, 1)).reshape(2, 2, cd, g, g)
        assert qd.shape == (2, cd, g, g) and torch.isfinite(sd).all()
        prior_fg, prior_ae = st.prior(qd, sd, sy)
        assert prior_fg.shape == prior_ae.shape == (2, 1, s, s)
        for p in (prior_fg, prior_ae):
            assert p.min() >= 0 and p.max() <= 1 + 1e-6
        mem, ptr = st.memory_encoder(feat, f0, f1, prior_fg)
        assert mem.shape == (2, 64, h, h) and ptr.shape == (2, 256)
        sup_mem = torch.stack([mem, mem], dim=1)
        ref = st.refinement(sup_mem, mem, mem.flip(0), sy, prior_fg, prior_ae)
        assert ref.shape == (2, 64, h, h)
        logits = st.decoder(feat, f0, f1, sup_mem, torch.stack([ptr, ptr], 1), ref, ptr, sy)
        assert logits.shape == (2, 1, s, s) and torch.isfinite(logits).all()


def test_memory_is_bf16_rounded(tiny_pipeline, tiny_cfg):
    q, sx, sy = make_episode(tiny_cfg)
    st = tiny_pipeline.stages
    with torch.no_grad():
        f0, f1, feat = st.image_encoder(q)
        mem, _ = st.memory_encoder(feat, f0, f1, sy[:, :1])
    assert torch.equal(mem, mem.to(torch.bfloat16).float())


def test_batch_equals_single_episodes(tiny_pipeline, tiny_cfg):
    q, sx, sy = make_episode(tiny_cfg, batch=2, seed=3)
    both = tiny_pipeline.segment(q, sx, sy)
    for b in range(2):
        one = tiny_pipeline.segment(q[b : b + 1], sx[b : b + 1], sy[b : b + 1])
        torch.testing.assert_close(both[b : b + 1], one, atol=1e-4, rtol=1e-4)


def test_support_features_hold_dino_features(tiny_pipeline, tiny_cfg):
    """The support side caches the supports' DINOv2 features: the query side never sees the support images."""
    q, sx, sy = make_episode(tiny_cfg, batch=1, shots=2, seed=2)
    sup = tiny_pipeline.encode_supports(sx, sy)
    g = tiny_cfg.dino_grid
    assert sup.dino.shape == (1, 2, tiny_cfg.dino_dim, g, g)
    with torch.no_grad():
        torch.testing.assert_close(sup.dino[0, 1], tiny_pipeline.stages.dino_features(sx[:, 1])[0], atol=1e-5, rtol=0)
    calls = []
    handle = tiny_pipeline.stages.dino_features.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        tiny_pipeline.segment_query(q, sup)
    finally:
        handle.remove()
    assert calls == [1], "the query side ran DINOv2 on more than the query"


@pytest.mark.parametrize("shots", [1, 5])
def test_cached_supports_equal_full_episode(tiny_pipeline, tiny_cfg, shots):
    q, sx, sy = make_episode(tiny_cfg, batch=1, shots=shots, seed=shots)
    full = tiny_pipeline.segment(q, sx, sy)
    session = tiny_pipeline.with_supports(sx, sy)
    torch.testing.assert_close(session.segment(q), full, atol=0, rtol=0)
    q2, _, _ = make_episode(tiny_cfg, batch=2, shots=shots, seed=10 + shots)
    many = session.segment(q2)
    assert many.shape == (2, 1, tiny_cfg.image_size, tiny_cfg.image_size)
    ref = tiny_pipeline.segment(q2[1:], sx, sy)
    torch.testing.assert_close(many[1:], ref, atol=1e-4, rtol=1e-4)


def test_5shot_quirk_uses_first_support_mask_only(tiny_pipeline, tiny_cfg):
    """Inside the attention only support 0's mask is seen (the reference passes s_mask[:, 0])."""
    q, sx, sy = make_episode(tiny_cfg, shots=5, seed=7)
    st = tiny_pipeline.stages
    with torch.no_grad():
        f0, f1, feat = st.image_encoder(q)
        sup = torch.randn(1, 5, 64, tiny_cfg.feat_size, tiny_cfg.feat_size)
        ptr = torch.randn(1, 5, 256)
        qm, qp = torch.randn(1, 64, tiny_cfg.feat_size, tiny_cfg.feat_size), torch.randn(1, 256)
        a = st.decoder(feat, f0, f1, sup, ptr, qm, qp, sy)
        sy2 = sy.clone()
        sy2[:, 1:] = 1 - sy2[:, 1:]
        b = st.decoder(feat, f0, f1, sup, ptr, qm, qp, sy2)
        sy3 = sy.clone()
        sy3[:, 0] = 1 - sy3[:, 0]
        c = st.decoder(feat, f0, f1, sup, ptr, qm, qp, sy3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_mask_values_255_are_ignored(tiny_pipeline, tiny_cfg):
    q, sx, sy = make_episode(tiny_cfg, seed=4)
    sy255 = sy.clone()
    sy255[..., :8, :] = 255
    torch.testing.assert_close(tiny_pipeline.segment(q, sx, sy255), tiny_pipeline.segment(q, sx, sy))


def test_empty_support_mask_warns_but_runs(tiny_pipeline, tiny_cfg):
    q, sx, sy = make_episode(tiny_cfg)
    with pytest.warns(UserWarning, match="all background"):
        out = tiny_pipeline.segment(q, sx, torch.zeros_like(sy))
    assert torch.isfinite(out).all()


def test_input_errors(tiny_pipeline, tiny_cfg):
    q, sx, sy = make_episode(tiny_cfg)
    with pytest.raises(InputError, match=r"query: expected shape \(1, 3, 256, 256\), got \(1, 3, 128, 128\)"):
        tiny_pipeline.segment(q[..., :128, :128], sx, sy)
    with pytest.raises(InputError, match="supports: expected shape"):
        tiny_pipeline.segment(q, sx[:, :, :1], sy)
    with pytest.raises(InputError, match=r"support_masks: expected shape \(1, 1, 256, 256\)"):
        tiny_pipeline.segment(q, sx, sy[:, :, :100])
    bad = q.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="query: 1 NaN/Inf"):
        tiny_pipeline.segment(bad, sx, sy)
    with pytest.raises(InputError, match=r"support_masks: values must be in \[0, 1\]"):
        tiny_pipeline.segment(q, sx, sy * 3)
