"""Ahead-of-time compilation of the fused kernel (what a TensorRT plugin's `aot_impl` needs).

`triton.compile(ASTSource(_calibrated_attn_fwd, signature, constexprs, attrs), target=...)` on
the same jitted function the PyTorch path launches. It needs no GPU: PTX for any NVIDIA
architecture can be built on a CPU-only machine (Triton ships ptxas). Not usable under
TRITON_INTERPRET=1 (the kernel is then an interpreted function, not a JITFunction).

The AOT variant assumes contiguous tensors (innermost strides baked in as 1) whose base
pointers are 16-byte aligned, which is what TensorRT hands a plugin.
"""

from __future__ import annotations

import math

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fssam_deploy.errors import BackendUnavailableError, InputError
from fssam_deploy.kernels.checks import SUPPORTED_HEAD_DIMS
from fssam_deploy.kernels.triton_calibrated_attention import INTERPRETED, KernelConfig, _calibrated_attn_fwd

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_POINTERS = ("Q", "K", "V", "C", "Out")
#: Innermost strides, fixed to 1 in the AOT kernel (contiguous inputs).
_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_cn", "stride_od")
#: Strides that are multiples of 16 elements for contiguous inputs with D in SUPPORTED_HEAD_DIMS.
_ALIGNED_STRIDES = ("stride_qz", "stride_qh", "stride_qm", "stride_kz", "stride_kh", "stride_kn", "stride_vz",
                    "stride_vh", "stride_vn", "stride_oz", "stride_oh", "stride_om")


def aot_source(dtype: torch.dtype, head_dim: int, config: KernelConfig, c_dtype: torch.dtype = torch.float32):
    """ASTSource of the kernel for contiguous `dtype` q/k/v/out, fp32 (or `c_dtype`) c and one config.

    Runtime (int32) arguments, in order: the 19 strides not fixed to 1, then H, N_Q, N_K, N_SUP, N_QRY.
    """
    if INTERPRETED:
        raise BackendUnavailableError("AOT compilation needs the compiled kernel: unset TRITON_INTERPRET")
    if dtype not in _TRITON_TYPES or c_dtype not in _TRITON_TYPES:
        raise InputError(f"aot_source: dtype {dtype} / c_dtype {c_dtype} not in {list(_TRITON_TYPES)}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise InputError(f"aot_source: head dim {head_dim} not in {SUPPORTED_HEAD_DIMS}")
    names = _calibrated_attn_fwd.arg_names
    constexprs = {"HEAD_DIM": head_dim, "SM_SCALE": 1.0 / math.sqrt(head_dim), "BLOCK_M": config.block_m,
                  "BLOCK_N": config.block_n, **{name: 1 for name in _UNIT_STRIDES}}
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _POINTERS:
            signature[name] = "*" + _TRITON_TYPES[c_dtype if name == "C" else dtype]
        else:
            signature[name] = "i32"
    aligned = set(_POINTERS) | set(_ALIGNED_STRIDES)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return ASTSource(_calibrated_attn_fwd, signature, constexprs=constexprs, attrs=attrs)


def compile_calibrated_attention(dtype: torch.dtype, head_dim: int, config: KernelConfig, arch: int = 90,
                                 c_dtype: torch.dtype = torch.float32):
    """Compile the kernel for NVIDIA compute capability `arch` (e.g. 80, 89, 90); returns triton's CompiledKernel.

    `kernel.asm["ptx"]` is the PTX, `kernel.metadata.name` the entry point, `kernel.metadata.shared`
    the dynamic shared memory in bytes; launch with block (num_warps * 32, 1, 1) and grid
    (cdiv(Nq, block_m), B * H, 1).
    """
    src = aot_source(dtype, head_dim, config, c_dtype)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
