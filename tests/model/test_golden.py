"""Stages against the golden vectors computed by the FSSAM reference code (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch

from fssam_deploy.model.memory_attention import CalibratedMemoryAttention
from fssam_deploy.model.prior import PrototypePrior, SupportPrototypes
from fssam_deploy.model.refinement import MemoryRefinement
from tests.helpers import load_golden

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["mem_refine_1shot_v1", "mem_refine_1shot_v2", "mem_refine_5shot_v1",
                                  "mem_refine_5shot_v2"])
def test_refinement_matches_reference(name):
    g, _, _ = load_golden(name)
    b, cm, h, w = g["qry_fg_mem"].shape
    k = g["sup_mem"].shape[0] // b
    stage = MemoryRefinement(int(g["num_refine"]), str(g["ver_refine"]))
    out = stage(g["sup_mem"].reshape(b, k, cm, h, w), g["qry_fg_mem"], g["qry_ae_mem"],
                g["sup_mask"].reshape(b, k, h, w), g["prior_fg"], g["prior_ae"])
    torch.testing.assert_close(out, g["qry_ae_mem_refined"], **TOL)


def test_refinement_iterations_match_reference():
    g, _, _ = load_golden("mem_refine_5shot_v2")
    b, cm, h, w = g["qry_fg_mem"].shape
    k = g["sup_mem"].shape[0] // b
    stage = MemoryRefinement(3, "v2")
    ma, ae = g["qry_ae_mem"].reshape(b, cm, h * w), g["prior_ae"].reshape(b, h * w)
    mf, fg = g["qry_fg_mem"].reshape(b, cm, h * w), g["prior_fg"].reshape(b, h * w)
    from fssam_deploy.model.refinement import memory_similarity

    p_qs = memory_similarity(mf, g["sup_mem"].reshape(b, k, cm, h * w), g["sup_mask"].reshape(b, k, 1, h * w))
    torch.testing.assert_close(p_qs.reshape(b, 1, h, w), g["p_qs"], **TOL)
    for i in range(3):
        ma, ae = stage.step(mf, ma, fg, ae, p_qs)
        torch.testing.assert_close(ma.reshape(b, cm, h, w), g[f"iter{i}_qry_ae_mem"], **TOL)
        torch.testing.assert_close(ae.reshape(b, 1, h, w), g[f"iter{i}_prior_ae"], **TOL)


@pytest.mark.parametrize("name", ["prior_proto_1shot", "prior_proto_5shot"])
def test_prior_matches_reference(name):
    g, _, _ = load_golden(name)
    size = int(g["fts_size"][0])
    b, k, c, gh, gw = g["sup_feats"].shape
    fg, bg = SupportPrototypes()(g["sup_feats"], g["sup_masks"].reshape(b, k, gh, gw))
    prior_fg, prior_ae = PrototypePrior(size)(g["qry_feat"], fg, bg)
    torch.testing.assert_close(prior_fg, g["prior_fg"], **TOL)
    torch.testing.assert_close(prior_ae, g["prior_ae"], **TOL)


def build_golden_memory_attention(sd: dict):
    """SAM 2's MemoryAttention at the golden's widths (d_model 64, memory 16, 8 x 8)."""
    from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
    from sam2.modeling.sam.transformer import RoPEAttention

    def attn(**kw):
        return RoPEAttention(embedding_dim=64, num_heads=1, downsample_rate=1, dropout=0.0, rope_theta=10000.0,
                             feat_sizes=(8, 8), **kw)

    layer = MemoryAttentionLayer(activation="relu", cross_attention=attn(kv_in_dim=16, rope_k_repeat=True),
                                 d_model=64, dim_feedforward=128, dropout=0.0, pos_enc_at_attn=False,
                                 pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=False,
                                 self_attention=attn())
    ma = MemoryAttention(d_model=64, pos_enc_at_input=True, layer=layer, num_layers=2).eval()
    ma.load_state_dict(sd, strict=True)
    return ma


def test_memory_attention_matches_reference():
    g, sd, _ = load_golden("memory_attention_1shot")
    module = CalibratedMemoryAttention(build_golden_memory_attention(sd), feat_size=8, backend="torch")
    bf = lambda t: t.transpose(0, 1)  # seq-first -> batch-first  # noqa: E731
    mask = g["memory_mask"].flatten(1)
    with torch.no_grad():
        out = module(bf(g["curr"]), bf(g["curr_pos"]), bf(g["memory"]), bf(g["memory_pos"]), mask,
                     int(g["num_obj_ptr_tokens"]))
    torch.testing.assert_close(out, bf(g["out"]), **TOL)


def test_rope_equals_sam2_complex_rope():
    from sam2.modeling.position_encoding import apply_rotary_enc, compute_axial_cis

    from fssam_deploy.model.rope import apply_rope, rope_tables

    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 64, 32), torch.randn(2, 1, 3 * 64, 32)
    q_ref, k_ref = apply_rotary_enc(q, k, freqs_cis=compute_axial_cis(32, 8, 8), repeat_freqs_k=True)
    cos, sin = rope_tables(32, 8, 8)
    # same tables and formula; complex multiplication may round the last bit differently
    torch.testing.assert_close(apply_rope(q, cos, sin), q_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(apply_rope(k, cos, sin), k_ref, atol=1e-6, rtol=1e-6)


def test_rope_table_matches_golden():
    g, _, _ = load_golden("calib_attn_1shot")
    from fssam_deploy.model.rope import rope_tables

    cos, sin = rope_tables(64, 8, 8)
    # torch.polar and torch.cos/sin may differ in the last bit
    torch.testing.assert_close(cos, g["freqs_cis"][..., 0], atol=2e-7, rtol=0)
    torch.testing.assert_close(sin, g["freqs_cis"][..., 1], atol=2e-7, rtol=0)
