"""GPU-only checks of the fused kernel: bf16 and the real SAM 2 shapes (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from fssam_deploy.kernels import calibrated_attention, calibrated_attention_reference
from fssam_deploy.kernels.triton_calibrated_attention import INTERPRETED, KernelConfig, calibrated_attention_triton

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    INTERPRETED or not torch.cuda.is_available(),
    reason="needs a CUDA GPU running the compiled kernel (no CUDA here, or TRITON_INTERPRET=1: bf16 tl.dot is "
    "wrong in the Triton interpreter and the full SAM 2 shapes are far too slow for it)",
)]

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
N = 1024  # 32 x 32 memory tokens per frame


def _inputs(b, n_q, n_sup, n_qry, rest, d, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n_k = n_sup + n_qry + rest
    q = torch.randn(b, 1, n_q, d, device="cuda", generator=gen, dtype=dtype)
    k = torch.randn(b, 1, n_k, d, device="cuda", generator=gen, dtype=dtype)
    v = torch.randn(b, 1, n_k, d, device="cuda", generator=gen, dtype=dtype)
    c = torch.rand(b, 1, n_qry, device="cuda", generator=gen)
    return q, k, v, c


# Fits the shared memory of every sm80+ GPU at D=256; used where autotuning would only add compile time.
SMALL_CONFIG = KernelConfig(32, 32, num_warps=4, num_stages=2)


def _check(q, k, v, c, n_sup, n_qry, backend="triton", config=None):
    if config is not None:
        out = calibrated_attention_triton(q, k, v, c, n_sup, n_qry, config=config)
    else:  # autotuned
        out = calibrated_attention(q, k, v, c, n_sup, n_qry, backend=backend)
    ref = calibrated_attention_reference(q, k, v, c, n_sup, n_qry)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), **TOL[q.dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_small_shapes(dtype):
    _check(*_inputs(2, 37, 30, 49, 5, 64, dtype), 30, 49, config=SMALL_CONFIG)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shots", [1, 5])
def test_sam2_shapes(shots, dtype):
    # Autotuned: the first use compiles every kept config (tens of seconds per dtype).
    # 1-shot: [support N | query N | 8 pointers]; 5-shot layout: [N | N | 4N more frames + 24 pointers].
    rest = 8 if shots == 1 else 4 * N + 24
    _check(*_inputs(1, N, N, N, rest, 256, dtype), N, N)


@pytest.mark.parametrize("d", [32, 64, 128, 256])
def test_head_dims_bf16(d):
    _check(*_inputs(2, 100, 64, 64, 8, d, torch.bfloat16), 64, 64, config=SMALL_CONFIG)


def test_op_on_cuda_runs_the_kernel():
    q, k, v, c = _inputs(2, N, N, N, 8, 256, torch.float16)
    _check(q, k, v, c, N, N, backend="op")
    _check(q, k, v, c, N, N, backend="auto")
    torch.testing.assert_close(calibrated_attention(q, k, v, c, N, N, backend="op"),
                               calibrated_attention_triton(q, k, v, c, N, N), atol=1e-3, rtol=1e-3)


def test_torch_compile_inductor_with_the_kernel():
    q, k, v, c = _inputs(1, 256, 256, 256, 8, 256, torch.float16)

    def f(q, k, v, c):
        return torch.ops.fssam.calibrated_attention(q, k, v, c, 256, 256) + 1.0

    import fssam_deploy.kernels.op  # noqa: F401  (registers the op)

    out = torch.compile(f, fullgraph=True)(q, k, v, c)
    torch.testing.assert_close(out.float(), f(q, k, v, c).float(), atol=2e-3, rtol=2e-3)
