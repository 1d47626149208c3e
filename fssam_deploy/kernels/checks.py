"""Input checks of the calibrated attention kernel (no Triton import: usable everywhere).

Every error names the tensor, the shape or value it got, what was expected, and how to fix it.
"""

from __future__ import annotations

import torch

from fssam_deploy.errors import InputError, expect_shape

#: Head dims the fused kernel is compiled for (tl.dot needs >= 16; SAM 2 uses 256).
SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)
#: Input dtypes of q, k, v (and of c, which is upcast to fp32 inside the kernel).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: CUDA limit on the second grid axis, which runs over B * H.
MAX_BATCH_HEADS = 65535

_WHERE = "calibrated_attention"


def _expect_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} in {_WHERE}: expected a torch.Tensor, got {type(x).__name__}")


def _expect_length(name: str, n) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, torch.SymInt)):
        raise InputError(f"{name} in {_WHERE}: expected a Python int, got {type(n).__name__} ({n!r})")
    if n < 0:
        raise InputError(f"{name} in {_WHERE}: expected a length >= 0, got {n}")


def _expect_dtypes(q, k, v, c) -> None:
    if q.dtype not in SUPPORTED_DTYPES:
        raise InputError(
            f"q in {_WHERE}: dtype {q.dtype} is not supported; use one of "
            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)} (cast with q.to(torch.float16))"
        )
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise InputError(f"{name} in {_WHERE}: dtype {x.dtype} differs from q's {q.dtype}; cast all three alike")
    if c.dtype not in SUPPORTED_DTYPES:
        raise InputError(f"c in {_WHERE}: dtype {c.dtype} is not a floating dtype the kernel reads; pass c.float()")


def _expect_same_device(q, k, v, c) -> None:
    for name, x in (("k", k), ("v", v), ("c", c)):
        if x.device != q.device:
            raise InputError(
                f"{name} in {_WHERE}: on device {x.device} but q is on {q.device}; move all inputs to one device"
            )


def check_calibrated_attention_inputs(q, k, v, c, n_sup, n_qry, *, head_dims=SUPPORTED_HEAD_DIMS) -> None:
    """Raise InputError unless (q, k, v, c, n_sup, n_qry) are valid inputs of the calibrated attention.

    q (B, H, Nq, D), k and v (B, H, Nk, D) of one dtype in SUPPORTED_DTYPES, c (B, H, n_qry) floating,
    all on one device, D in `head_dims` (None: any), n_sup >= 0, n_qry >= 1, n_sup + n_qry <= Nk.
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("c", c)):
        _expect_tensor(name, x)
    _expect_length("n_sup", n_sup)
    _expect_length("n_qry", n_qry)
    if n_qry == 0:
        raise InputError(
            f"n_qry in {_WHERE}: the query block is empty, so its row min-max (and the calibration) is "
            "undefined, as in the reference; use plain attention (F.scaled_dot_product_attention)"
        )
    expect_shape("q", q, (None, None, None, None), _WHERE)
    b, h, _, d = q.shape
    expect_shape("k", k, (b, h, None, d), _WHERE)
    expect_shape("v", v, tuple(k.shape), _WHERE)
    expect_shape("c", c, (b, h, n_qry), _WHERE)
    n_k = k.shape[2]
    if n_sup + n_qry > n_k:
        raise InputError(
            f"n_sup + n_qry in {_WHERE}: {n_sup} + {n_qry} = {n_sup + n_qry} exceeds the {n_k} keys of k "
            f"(shape {tuple(k.shape)}); the layout is [support | query block | rest]"
        )
    if head_dims is not None and d not in head_dims:
        raise InputError(
            f"q in {_WHERE}: head dim {d} (shape {tuple(q.shape)}) is not supported by the fused kernel; "
            f"supported: {head_dims}; use backend='torch' for other sizes"
        )
    if b * h > MAX_BATCH_HEADS:
        raise InputError(f"q in {_WHERE}: B * H = {b * h} exceeds {MAX_BATCH_HEADS}; split the batch")
    _expect_dtypes(q, k, v, c)
    _expect_same_device(q, k, v, c)
