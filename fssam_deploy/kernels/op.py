"""`fssam::calibrated_attention` as a torch.library operator.

    fssam::calibrated_attention(Tensor q, Tensor k, Tensor v, Tensor c, int n_sup, int n_qry) -> Tensor

With Triton installed it is a `torch.library.triton_op`: on CUDA tensors it launches the fused
kernel through `wrap_triton`, so torch.compile / Inductor / AOTInductor see (and can package) the
kernel; on CPU and other devices, on GPUs the kernel does not support (compute capability < 8.0)
and for head dims the kernel is not built for, it runs the plain PyTorch reference. The same
function body, run on fake tensors, is the op's fake implementation (shape/dtype propagation for
torch.compile and torch.export). Without Triton the op is a `torch.library.custom_op` around the
reference with a `register_fake` implementation.

Importing this module registers the op; `torch.ops.fssam.calibrated_attention` is then callable.
Under TRITON_INTERPRET=1 some PyTorch releases refuse `wrap_triton` on interpreted kernels
(pytorch#152868), so the CUDA branch then calls the kernel directly (CPU tests call the wrapper
`calibrated_attention_triton` directly instead).
"""

from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import is_fake

from fssam_deploy.kernels.checks import SUPPORTED_HEAD_DIMS, check_calibrated_attention_inputs
from fssam_deploy.kernels.reference import calibrated_attention_reference

OP_NAME = "fssam::calibrated_attention"
OP_SCHEMA = "(Tensor q, Tensor k, Tensor v, Tensor c, int n_sup, int n_qry) -> Tensor"

try:
    from fssam_deploy.kernels import triton_calibrated_attention as _tk
    from fssam_deploy.kernels.triton_calibrated_attention import _calibrated_attn_fwd_tuned
except ImportError:  # Triton is not installed: the op is the reference.
    _tk = None


def _kernel_runs_on(q: torch.Tensor) -> bool:
    """True when the fused kernel handles q's device and head dim (fake tensors included)."""
    if _tk is None or q.device.type != "cuda" or q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return False
    return _tk.INTERPRETED or is_fake(q) or _tk.device_supported(q.device)


def _device_guard(q: torch.Tensor):
    # The launcher uses the current CUDA device; make it q's (not while tracing with fake tensors).
    if is_fake(q) or q.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(q.device)


if _tk is not None:
    from torch.library import triton_op, wrap_triton

    # Annotated as well as given a schema: torch 2.11's triton_op infers the schema from the annotations.
    @triton_op(OP_NAME, mutates_args=(), schema=OP_SCHEMA)
    def calibrated_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor, n_sup: int,
                                n_qry: int) -> torch.Tensor:
        """The registered op: fused Triton kernel on supported CUDA tensors, the reference elsewhere."""
        if not _kernel_runs_on(q):
            return calibrated_attention_reference(q, k, v, c, n_sup, n_qry)
        check_calibrated_attention_inputs(q, k, v, c, n_sup, n_qry)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (B, H, Nq, D)
        if out.numel() == 0:
            return out
        if _tk.INTERPRETED:  # pytorch#152868: no wrap_triton on interpreted kernels
            return out if is_fake(q) else _tk.calibrated_attention_triton(q, k, v, c, n_sup, n_qry)
        with _device_guard(q):
            _tk.launch_calibrated_attention(wrap_triton(_calibrated_attn_fwd_tuned), q, k, v, c, out, n_sup, n_qry,
                                            None)
        return out

else:

    @torch.library.custom_op(OP_NAME, mutates_args=(), schema=OP_SCHEMA)
    def calibrated_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor, n_sup: int,
                                n_qry: int) -> torch.Tensor:
        """The registered op without Triton: the plain PyTorch reference on every device."""
        return calibrated_attention_reference(q, k, v, c, n_sup, n_qry)

    @calibrated_attention_op.register_fake
    def _calibrated_attention_fake(q, k, v, c, n_sup, n_qry):
        return q.new_empty(q.shape)
