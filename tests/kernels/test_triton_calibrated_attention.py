"""The fused Triton kernel against the plain PyTorch reference and the FSSAM golden vectors.

On a CPU-only machine these run in Triton's interpreter (see conftest.py), fp32 and fp16 only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fssam_deploy.errors import InputError
from fssam_deploy.kernels import calibrated_attention_reference, calibration_weights
from fssam_deploy.kernels.triton_calibrated_attention import KernelConfig, calibrated_attention_triton

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "data" / "golden"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5),
       # fp16: P is rounded to fp16 before P @ V (as in FlashAttention); the reference keeps fp32.
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


# A fixed launch config: on a GPU, autotuning every test shape would compile ~10 configs each.
DEFAULT_CONFIG = KernelConfig(64, 64)


def assert_matches_reference(q, k, v, c, n_sup, n_qry, config=DEFAULT_CONFIG):
    out = calibrated_attention_triton(q, k, v, c, n_sup, n_qry, config=config)
    ref = calibrated_attention_reference(q, k, v, c, n_sup, n_qry)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    torch.testing.assert_close(out.float(), ref.float(), **TOL[q.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "case",
    [
        dict(n_q=64, d=32, n_sup=64, n_qry=64, rest=8),  # 1-shot layout, 8 pointer tokens
        dict(n_q=37, d=64, n_sup=30, n_qry=49, rest=5),  # odd lengths everywhere
        dict(n_q=64, d=32, n_sup=64, n_qry=64, rest=4 * 64 + 24),  # 5-shot layout: 4 more frames + 24 pointers
        dict(b=2, h=3, n_q=20, d=32, n_sup=16, n_qry=24, rest=3),  # batch and heads
        dict(n_q=16, d=32, n_sup=0, n_qry=40, rest=0),  # query block only
        dict(n_q=16, d=32, n_sup=1, n_qry=1, rest=1),  # one key per segment
    ],
    ids=["1shot", "odd", "5shot-layout", "batch-heads", "qry-only", "tiny"],
)
def test_matches_reference(make_inputs, case, dtype):
    q, k, v, c = make_inputs(dtype=dtype, **case)
    assert_matches_reference(q, k, v, c, case["n_sup"], case["n_qry"])


@pytest.mark.parametrize("config", [KernelConfig(16, 16), KernelConfig(32, 64), KernelConfig(128, 32)],
                         ids=lambda cfg: f"m{cfg.block_m}n{cfg.block_n}")
def test_tile_sizes_and_unaligned_segments(make_inputs, config):
    # Segment boundaries (30, 79, 84) fall inside tiles for every tile size.
    q, k, v, c = make_inputs(n_q=37, d=64, n_sup=30, n_qry=49, rest=5)
    assert_matches_reference(q, k, v, c, 30, 49, config=config)


def test_head_dim_128_and_256(make_inputs):
    for d in (128, 256):
        q, k, v, c = make_inputs(n_q=16, d=d, n_sup=16, n_qry=16, rest=4)
        assert_matches_reference(q, k, v, c, 16, 16, config=KernelConfig(16, 16))


def test_non_contiguous_inputs(make_inputs):
    # Heads split from (B, N, H*D) give (B, H, N, D) views with non-trivial strides.
    q, k, v, c = make_inputs(b=2, h=2, n_q=24, d=32, n_sup=16, n_qry=16, rest=4)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    c = torch.cat([c, c], dim=-1)[..., ::2]
    assert not q.is_contiguous() and not c.is_contiguous()
    assert_matches_reference(q, k, v, c, 16, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_all_equal_logits_use_eps_like_reference(make_inputs, dtype):
    # Rows whose query-block logits are all equal: max - min = 0, so A = 0 / eps = 0 and the bias is
    # 10 * (c - 1). Any rounding difference between equal logits would be amplified 1e7 times, so the
    # inputs are small integers (every dot product is exact in any summation order, as it is not for
    # random floats in BLAS or numpy).
    q, k, v, c = make_inputs(n_q=32, d=32, n_sup=16, n_qry=24, rest=4, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-2, 3, q.shape, generator=gen).to(q)
    k = torch.randint(-2, 3, k.shape, generator=gen).to(k)
    k[:, :, 16:40] = k[:, :, 16:17]  # identical query-block keys: each row constant on the block
    q[:, :, 3] = 0.0  # an all-zero query: every logit of that row is 0
    assert_matches_reference(q, k, v, c, 16, 24)
    assert_matches_reference(q, k, v, c, 16, 24, config=KernelConfig(16, 16))


def test_eps_matters_on_a_tiny_logit_range(make_inputs):
    # Query-block logits in {0, 2^-23 / 8}: a range below eps = 1e-7, so A = range / (range + eps) ~ 0.13
    # and with c = 0.5 the bias is about -3.7 on the larger logits and -5 on the others. Powers of two keep
    # every product and sum exact. A kernel applying eps to raw (unscaled) dots would give A ~ 0.54, bias 0.
    q, k, v, _ = make_inputs(n_q=16, d=64, n_sup=8, n_qry=16, rest=2)
    q.zero_()
    q[..., 0] = 2.0**-10
    k[:, :, 8:24] = 0.0
    k[:, :, 8:24:2, 0] = 2.0**-13
    c = torch.full((1, 1, 16), 0.5, device=q.device)
    assert_matches_reference(q, k, v, c, 8, 16)


def test_zero_calibration_from_empty_support_mask(make_inputs):
    q, k, v, _ = make_inputs(b=2, n_q=32, d=32, n_sup=32, n_qry=32, rest=8)
    mask = torch.zeros(2, 32)
    mask[0, :10] = 1.0
    c = calibration_weights(k[:, :, :32].float(), k[:, :, 32:64].float(), mask.to(k.device))
    assert torch.all(c[1] == 0)
    assert_matches_reference(q, k, v, c, 32, 32)


def test_empty_query_rows(make_inputs):
    q, k, v, c = make_inputs(n_q=0, d=32, n_sup=8, n_qry=8, rest=1)
    assert calibrated_attention_triton(q, k, v, c, 8, 8).shape == (1, 1, 0, 32)


# ------------------------------------------------------------------------------------------ golden


def _load_golden(name: str, device: str):
    z = np.load(GOLDEN_DIR / f"calib_attn_{name}.npz", allow_pickle=False)
    t = {key: torch.from_numpy(z[key]).to(device) for key in z.files if z[key].dtype == np.float32}
    return t, json.loads(str(z["meta"]))


@pytest.mark.parametrize("name", ["1shot", "5shot_layout", "empty_support"])
def test_golden_vectors(kernel_device, name):
    g, _ = _load_golden(name, kernel_device)
    n = g["q_rope"].shape[2]  # 64 tokens per frame; block 0 support, block 1 calibrated
    c = g["cos_norm"][:, :, 0, :]  # (B, 1, 64)
    out = calibrated_attention_triton(g["q_rope"], g["k_rope"], g["v_heads"], c, n, n)  # (B, 1, 64, 64)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, g["attn_probs"] @ g["v_heads"], **tol)
    torch.testing.assert_close(out, calibrated_attention_reference(g["q_rope"], g["k_rope"], g["v_heads"], c, n, n),
                               **tol)
    b, h, n_q, d = out.shape
    merged = out.transpose(1, 2).reshape(b, n_q, h * d)  # (B, Nq, C)
    projected = merged @ g["state_dict.out_proj.weight"].T + g["state_dict.out_proj.bias"]
    torch.testing.assert_close(projected, g["out"], **tol)


# -------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "mutate, n_sup, n_qry, match",
    [
        (lambda q, k, v, c: (q, k[..., :16], v, c), 8, 8, r"k in calibrated_attention: expected shape \(1, 1, \*, 32"),
        (lambda q, k, v, c: (q, k, v[:, :, :-1], c), 8, 8, r"v in calibrated_attention: expected shape"),
        (lambda q, k, v, c: (q, k, v, c[..., :4]), 8, 8, r"c in calibrated_attention: expected shape \(1, 1, 8\)"),
        (lambda q, k, v, c: (q[0], k, v, c), 8, 8, r"q in calibrated_attention: expected shape \(\*, \*, \*, \*\)"),
        (lambda q, k, v, c: (q, k, v, c), 8, 20, r"c in calibrated_attention: expected shape \(1, 1, 20\)"),
        (lambda q, k, v, c: (q, k, v, c[..., :1]), 16, 1, r"16 \+ 1 = 17 exceeds the 16 keys"),
        (lambda q, k, v, c: (q.long(), k, v, c), 8, 8, r"q in calibrated_attention: dtype torch.int64"),
        (lambda q, k, v, c: (q, k.half(), v, c), 8, 8, r"k in calibrated_attention: dtype torch.float16 differs"),
        (lambda q, k, v, c: (q, k, v, c.long()), 8, 8, r"c in calibrated_attention: dtype torch.int64"),
        (lambda q, k, v, c: (q.numpy(), k, v, c), 8, 8, r"q in calibrated_attention: expected a torch.Tensor"),
        (lambda q, k, v, c: (q, k, v, c.to("meta")), 8, 8, r"c in calibrated_attention: on device meta"),
        (lambda q, k, v, c: (q, k, v, c), 8.0, 8, r"n_sup in calibrated_attention: expected a Python int"),
        (lambda q, k, v, c: (q, k, v, c), -1, 8, r"n_sup in calibrated_attention: expected a length >= 0"),
        (lambda q, k, v, c: (q[..., :16], k[..., :16], v[..., :16], c), 8, 8, r"head dim 16"),
        (lambda q, k, v, c: (q, k, v, c[..., :0]), 8, 0, r"n_qry in calibrated_attention: the query block is empty"),
    ],
)
def test_input_errors(mutate, n_sup, n_qry, match):
    q, k, v, c = (torch.randn(1, 1, 4, 32), torch.randn(1, 1, 16, 32), torch.randn(1, 1, 16, 32), torch.rand(1, 1, 8))
    with pytest.raises(InputError, match=match):
        calibrated_attention_triton(*mutate(q, k, v, c), n_sup, n_qry)


def test_no_backward():
    q, k, c = torch.randn(1, 1, 4, 32, requires_grad=True), torch.randn(1, 1, 16, 32), torch.rand(1, 1, 8)
    with pytest.raises(InputError, match="the fused kernel has no backward"):
        calibrated_attention_triton(q, k, k, c, 8, 8)


def test_kernel_config_rejects_bad_tiles():
    with pytest.raises(ValueError, match="block_n: expected a power of two >= 16, got 24"):
        KernelConfig(block_m=16, block_n=24)
