"""Kernel tests run the fused Triton kernel on CUDA when there is a GPU, else on CPU in Triton's interpreter.

TRITON_INTERPRET must be set before Triton itself is imported (triton.language's own jitted helpers
and our kernel are decorated at import). pytest imports this file before the test modules beside it;
if triton was imported earlier in the session (by tests collected before these), the kernel tests
skip with a reason rather than fail.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _make_inputs(b=1, h=1, n_q=64, d=32, n_sup=64, n_qry=64, rest=8, dtype=torch.float32, device="cpu", seed=0):
    """Random (q, k, v, c) for the key layout [n_sup support | n_qry query block | rest plain]."""
    gen = torch.Generator().manual_seed(seed)
    n_k = n_sup + n_qry + rest
    q = torch.randn(b, h, n_q, d, generator=gen)
    k = torch.randn(b, h, n_k, d, generator=gen)
    v = torch.randn(b, h, n_k, d, generator=gen)
    c = torch.rand(b, h, n_qry, generator=gen)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), c.to(device)


@pytest.fixture(scope="session")
def kernel_device() -> str:
    """Where the fused kernel runs in this session: CPU under the interpreter, else CUDA."""
    from fssam_deploy.kernels.triton_calibrated_attention import INTERPRETED

    if not INTERPRETED and not torch.cuda.is_available():
        pytest.skip(
            "no CUDA GPU and the Triton interpreter is off: TRITON_INTERPRET was set to something else, or triton "
            "was imported before this conftest (run `TRITON_INTERPRET=1 pytest ...` or `pytest tests/kernels`)"
        )
    return "cpu" if INTERPRETED else "cuda"


@pytest.fixture(scope="session")
def make_inputs(kernel_device):
    """Factory of random inputs on the kernel's device: make_inputs(b=, h=, n_q=, d=, n_sup=, n_qry=, rest=, dtype=)."""

    def make(**kwargs):
        kwargs.setdefault("device", kernel_device)
        return _make_inputs(**kwargs)

    return make
