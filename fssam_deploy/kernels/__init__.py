"""FSSAM's own operator, the support-calibrated attention: reference, fused Triton kernel, op.

`calibrated_attention(..., backend=...)` picks the implementation:
  "torch"   the plain PyTorch reference (`reference.py`); what ONNX export traces (plain torch ops)
  "triton"  the fused Triton kernel (`triton_calibrated_attention.py`); errors if it cannot run
  "op"      the torch.library op `fssam::calibrated_attention` (`op.py`): the kernel on CUDA,
            the reference elsewhere, visible to torch.compile / export
  "auto"    "op" when q is a CUDA tensor and Triton works, else "torch"
`calibration_weights` (the c vector) is plain torch ops and runs on any device, GPU included;
no fused kernel was written for it (it is small next to the attention, and no GPU was at hand
to show a gain). Triton is imported lazily: this package imports without it and without a GPU.
"""

from __future__ import annotations

import importlib

import torch

from fssam_deploy.errors import BackendUnavailableError, ConfigError
from fssam_deploy.kernels.reference import calibrated_attention_reference, calibration_weights, minmax, weighted_gap

BACKENDS = ("auto", "torch", "triton", "op")


def _kernel_module():
    """The fused-kernel module, or None when Triton cannot be imported."""
    try:
        return importlib.import_module(".triton_calibrated_attention", __name__)
    except ImportError:
        return None


def triton_available() -> bool:
    """True when Triton imports and the fused kernel can run here.

    That is: a CUDA GPU of compute capability >= 8.0, or TRITON_INTERPRET=1 (kernel on CPU tensors).
    """
    module = _kernel_module()
    if module is None:
        return False
    return module.INTERPRETED or (torch.cuda.is_available() and module.device_supported(torch.device("cuda")))


def calibrated_attention(q, k, v, c, n_sup: int, n_qry: int, backend: str = "auto") -> torch.Tensor:
    """Support-calibrated attention softmax(q k^T / sqrt(D) + bias) v with the query-block bias.

    q (B, H, Nq, D), k and v (B, H, Nk, D), c (B, H, n_qry) -> (B, H, Nq, D) in q's dtype.
    Key layout: [0, n_sup) support | [n_sup, n_sup + n_qry) query block (calibrated) | rest plain.
    `backend` is one of BACKENDS (see the package docstring).
    """
    if backend == "torch":
        return calibrated_attention_reference(q, k, v, c, n_sup, n_qry)
    if backend == "triton":
        module = _kernel_module()
        if module is None:
            raise BackendUnavailableError("backend='triton' needs the triton package: pip install triton")
        return module.calibrated_attention_triton(q, k, v, c, n_sup, n_qry)
    if backend == "op":
        importlib.import_module(".op", __name__)  # registers fssam::calibrated_attention
        return torch.ops.fssam.calibrated_attention(q, k, v, c, n_sup, n_qry)
    if backend == "auto":
        if isinstance(q, torch.Tensor) and q.device.type == "cuda" and triton_available():
            return calibrated_attention(q, k, v, c, n_sup, n_qry, backend="op")
        return calibrated_attention_reference(q, k, v, c, n_sup, n_qry)
    raise ConfigError(f"calibrated_attention: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "calibrated_attention",
    "calibrated_attention_reference",
    "calibration_weights",
    "minmax",
    "triton_available",
    "weighted_gap",
]
