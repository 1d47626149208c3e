"""Fused support-calibrated attention: one Triton kernel, no Nq x Nk matrix in memory.

Layout of the key axis (see `reference.py`):
    [0, n_sup)              support block           plain logits
    [n_sup, n_sup + n_qry)  query-memory block      calibrated logits
    [n_sup + n_qry, Nk)     rest (pointer tokens, further memory frames in the 5-shot layout): plain

With r = q.k (the raw dot product) and L = r / sqrt(D) the reference computes, on the query block,
    A = (L - min L) / (max L - min L + eps),   L += min(A + c_j - 1, 0) * 10
and then softmax(L) v. Since L = s r with s = 1 / sqrt(D),
    A = (r - min r) / (max r - min r + eps / s),
which is the same number in exact arithmetic and is computed from the raw dot products, so an
all-equal row gives A == 0 exactly (no fused multiply-add can round r * s differently in the two
sweeps below). Each program owns BLOCK_M query rows of one (batch, head) and makes two sweeps:
  A. over the query block only: the row min and max of r (n_qry / Nk more q k^T work: +50% of
     it, +25% of all FLOPs, for 1-shot; +17% of it for the 5-shot layout);
  B. over all keys, FlashAttention-style: a running max m, running sum l and accumulator acc,
     rescaled by exp2(m_old - m_new) whenever the max grows; the query block gets the bias.
Logits are kept in base 2 (t = L * log2 e) so that exp2 is the only transcendental.

The kernel uses plain pointer loads only (no TMA descriptors, no scratch, no clusters) and takes
int lengths at run time, so `triton.compile` can build it ahead of time for a TensorRT plugin
(see `aot.py`). Under TRITON_INTERPRET=1 (set before triton is imported) it runs on CPU tensors;
bf16 `tl.dot` is wrong in the interpreter, fp32/fp16 are right. fp32 inputs use IEEE dots (CUDA
cores, like the fp32 reference); fp16/bf16 use tensor cores with fp32 accumulation, and P is
rounded to the input dtype before P @ V, as in FlashAttention.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fssam_deploy.errors import BackendUnavailableError, InputError
from fssam_deploy.kernels.checks import check_calibrated_attention_inputs
from fssam_deploy.kernels.reference import BIAS_SCALE, EPS

_LOG2E = tl.constexpr(1.4426950408889634)
_EPS = tl.constexpr(EPS)
_BIAS_LOG2 = tl.constexpr(BIAS_SCALE * 1.4426950408889634)


# ----------------------------------------------------------------------------------- capability


def device_supported(device: torch.device) -> bool:
    """True when the compiled kernel can run on `device`: NVIDIA CUDA, compute capability >= 8.0."""
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip is not None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


#: Opt-in shared memory per block of the smallest sm80+ parts (sm86/89/120); used without a driver.
_DEFAULT_SHARED_MEMORY = 99 * 1024


@functools.cache
def _max_shared_memory(device_index: int) -> int:
    if not torch.cuda.is_available():  # e.g. tracing with fake CUDA tensors on a CPU-only machine
        return _DEFAULT_SHARED_MEMORY
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or _DEFAULT_SHARED_MEMORY)


# ---------------------------------------------------------------------------------------- kernel


@triton.jit
def _mma(a, b):
    # fp32 inputs: exact IEEE products like the reference (the GPU default would be TF32).
    if a.dtype == tl.float32:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _qk_tile(q, k_base, stride_kn, stride_kd, start_n, end_n, offs_d, BLOCK_N: tl.constexpr):
    # Raw dot products r = q . k for keys [start_n, start_n + BLOCK_N), masked at end_n.
    offs_n = start_n + tl.arange(0, BLOCK_N)
    valid = offs_n < end_n
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=valid[:, None], other=0.0)
    return _mma(q, tl.trans(k)), offs_n, valid  # (BLOCK_M, BLOCK_N) fp32


@triton.jit
def _query_block_min_max(q, k_base, stride_kn, stride_kd, lo, hi, offs_d, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    # Sweep A: per row, min and max of r over the query block [lo, hi).
    r_min = tl.full([BLOCK_M], float("inf"), tl.float32)
    r_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        r, offs_n, valid = _qk_tile(q, k_base, stride_kn, stride_kd, start_n, hi, offs_d, BLOCK_N)
        r_min = tl.minimum(r_min, tl.min(tl.where(valid[None, :], r, float("inf")), 1))
        r_max = tl.maximum(r_max, tl.max(tl.where(valid[None, :], r, float("-inf")), 1))
    return r_min, r_max


@triton.jit
def _softmax_segment(acc, l_i, m_i, q, k_base, v_base, c_base, stride_kn, stride_kd, stride_vn, stride_vd,
                     stride_cn, lo, hi, r_min, inv_range, offs_d,
                     SM_SCALE: tl.constexpr, CALIBRATE: tl.constexpr, BLOCK_N: tl.constexpr):
    # Sweep B over keys [lo, hi): online softmax in base 2.
    for start_n in range(lo, hi, BLOCK_N):
        r, offs_n, valid = _qk_tile(q, k_base, stride_kn, stride_kd, start_n, hi, offs_d, BLOCK_N)
        t = r * (SM_SCALE * _LOG2E)  # L * log2(e)
        if CALIBRATE:
            # c_j of the query-block keys; A = row min-max of L; bias = min(A + c - 1, 0) * 10.
            c = tl.load(c_base + (offs_n - lo) * stride_cn, mask=valid, other=0.0).to(tl.float32)
            a = (r - r_min[:, None]) * inv_range[:, None]
            t += tl.minimum(a + c[None, :] - 1.0, 0.0) * _BIAS_LOG2
        t = tl.where(valid[None, :], t, float("-inf"))
        # Rescale what was accumulated so far by 2^(m_old - m_new), then add this tile.
        m_new = tl.maximum(m_i, tl.max(t, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(t - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=valid[:, None],
                    other=0.0)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _calibrated_attn_fwd(
    Q, K, V, C, Out,  #
    stride_qz, stride_qh, stride_qm, stride_qd,  #
    stride_kz, stride_kh, stride_kn, stride_kd,  #
    stride_vz, stride_vh, stride_vn, stride_vd,  #
    stride_cz, stride_ch, stride_cn,  #
    stride_oz, stride_oh, stride_om, stride_od,  #
    H, N_Q, N_K, N_SUP, N_QRY,  #
    HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
):
    """Out[z, h, m] = softmax of the calibrated logits of q[z, h, m] over all keys, times v.

    Grid (cdiv(Nq, BLOCK_M), B * H). Lengths are runtime ints; D, the scale and the tiles are constexprs.
    """
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_z = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    q_base = Q + off_z * stride_qz + off_h * stride_qh
    k_base = K + off_z * stride_kz + off_h * stride_kh
    v_base = V + off_z * stride_vz + off_h * stride_vh
    c_base = C + off_z * stride_cz + off_h * stride_ch
    o_base = Out + off_z * stride_oz + off_h * stride_oh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)

    qry_lo = N_SUP
    qry_hi = N_SUP + N_QRY
    r_min, r_max = _query_block_min_max(q, k_base, stride_kn, stride_kd, qry_lo, qry_hi, offs_d, BLOCK_M, BLOCK_N)
    # 1 / (max L - min L + eps) expressed on raw dots: eps / SM_SCALE (see the module docstring).
    inv_range = 1.0 / (r_max - r_min + _EPS / SM_SCALE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _softmax_segment(acc, l_i, m_i, q, k_base, v_base, c_base, stride_kn, stride_kd, stride_vn,
                                     stride_vd, stride_cn, 0, qry_lo, r_min, inv_range, offs_d, SM_SCALE, False,
                                     BLOCK_N)
    acc, l_i, m_i = _softmax_segment(acc, l_i, m_i, q, k_base, v_base, c_base, stride_kn, stride_kd, stride_vn,
                                     stride_vd, stride_cn, qry_lo, qry_hi, r_min, inv_range, offs_d, SM_SCALE, True,
                                     BLOCK_N)
    acc, l_i, m_i = _softmax_segment(acc, l_i, m_i, q, k_base, v_base, c_base, stride_kn, stride_kd, stride_vn,
                                     stride_vd, stride_cn, qry_hi, N_K, r_min, inv_range, offs_d, SM_SCALE, False,
                                     BLOCK_N)
    out = acc / l_i[:, None]
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None])


#: True when TRITON_INTERPRET=1 was set before this module was imported (the kernel runs on CPU).
INTERPRETED = not isinstance(_calibrated_attn_fwd, triton.runtime.JITFunction)


# -------------------------------------------------------------------------------------- autotune


def _autotune_configs() -> list[triton.Config]:
    # (BLOCK_M, BLOCK_N, num_stages, num_warps). Small BLOCK_M keeps more programs alive at Nq=1024, B=1.
    shapes = [(16, 32, 1, 4), (16, 64, 2, 4), (32, 32, 2, 4), (32, 64, 2, 4), (32, 64, 3, 4), (64, 32, 2, 4),
              (64, 64, 2, 4), (64, 64, 2, 8), (64, 64, 3, 8), (64, 128, 2, 8), (128, 64, 2, 8), (128, 32, 3, 8)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w) for bm, bn, s, w in shapes]


def estimated_shared_memory(block_m: int, block_n: int, num_stages: int, head_dim: int, elem_bytes: int) -> int:
    """Bytes of shared memory a config needs, roughly: the q tile plus `num_stages` K and V tiles."""
    return (block_m * head_dim + 2 * num_stages * block_n * head_dim) * elem_bytes


def _prune_configs(configs, named_args, **kwargs):
    # Drop configs that cannot fit the device's shared memory (critical at D=256), that keep more than
    # 128 fp32 accumulator registers per thread, or whose tiles are larger than the problem. fp32 runs
    # IEEE dots on CUDA cores (an accuracy path, slow to compile): only small tiles.
    meta = {**named_args, **kwargs}
    q, head_dim = meta["Q"], meta["HEAD_DIM"]
    limit = _max_shared_memory(q.device.index or 0) if q.device.type == "cuda" else 1 << 30
    max_m = max(16, triton.next_power_of_2(meta["N_Q"]))
    max_n = max(16, triton.next_power_of_2(meta["N_K"]))
    max_tile = 32 * 32 if q.element_size() == 4 else 1 << 30

    def fits(cfg):
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        smem = estimated_shared_memory(bm, bn, cfg.num_stages, head_dim, q.element_size())
        return (smem <= limit and bm * head_dim <= 128 * 32 * cfg.num_warps and bm <= max_m and bn <= max_n
                and bm * bn <= max_tile)

    kept = [cfg for cfg in configs if fits(cfg)]
    smallest = min(configs, key=lambda cfg: estimated_shared_memory(cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"],
                                                                    cfg.num_stages, head_dim, q.element_size()))
    return kept or [smallest]


# Tuning results live in this process (Triton's default): nothing is ever written into the installed
# package; with TRITON_CACHE_AUTOTUNING=1 Triton keeps them in its own cache dir (TRITON_CACHE_DIR).
_calibrated_attn_fwd_tuned = triton.autotune(
    configs=_autotune_configs(),
    key=["N_Q", "N_K", "HEAD_DIM"],  # the autotuner appends the dtypes of the tensor arguments
    prune_configs_by={"early_config_prune": _prune_configs},
)(_calibrated_attn_fwd)


# --------------------------------------------------------------------------------------- wrapper


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration of the kernel (bypasses autotuning)."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            val = getattr(self, name)
            if val < 16 or val & (val - 1):
                raise ValueError(f"KernelConfig.{name}: expected a power of two >= 16, got {val}")


#: Used under TRITON_INTERPRET=1, where autotuning would only time numpy.
INTERPRETER_CONFIG = KernelConfig(block_m=64, block_n=64)


def launch_calibrated_attention(kernel, q, k, v, c, out, n_sup: int, n_qry: int, config: KernelConfig | None):
    """Launch `kernel` (the autotuned kernel, the plain jitted one, or either under `wrap_triton`) into `out`.

    With `config` None the kernel must be the autotuned one; otherwise `config` is passed explicitly.
    """
    b, h, n_q, d = q.shape
    n_k = k.shape[2]

    def grid(meta):
        return (triton.cdiv(n_q, meta["BLOCK_M"]), b * h, 1)

    extra = {}
    if config is not None:
        extra = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps,
                     num_stages=config.num_stages)
    kernel[grid](
        q, k, v, c, out,  #
        *q.stride(), *k.stride(), *v.stride(), *c.stride(), *out.stride(),  #
        h, n_q, n_k, n_sup, n_qry,  #
        HEAD_DIM=d, SM_SCALE=1.0 / math.sqrt(d), **extra,
    )
    return out


def calibrated_attention_triton(q, k, v, c, n_sup: int, n_qry: int, *, config: KernelConfig | None = None):
    """Fused calibrated attention (see module docstring). Returns (B, H, Nq, D) in q's dtype.

    q (B, H, Nq, D), k and v (B, H, Nk, D) in fp32/fp16/bf16 with D in {32, 64, 128, 256};
    c (B, H, n_qry) calibration weights. `config` None autotunes on (Nq, Nk, D, dtype) on GPU and
    uses INTERPRETER_CONFIG under TRITON_INTERPRET=1. Inference only (no backward). Raises InputError
    for invalid inputs and BackendUnavailableError when the tensors' device cannot run the kernel.
    """
    check_calibrated_attention_inputs(q, k, v, c, n_sup, n_qry)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, c)):
        raise InputError(
            "calibrated_attention_triton: the fused kernel has no backward, but an input requires grad; "
            "use backend='torch' for training, or call it under torch.no_grad()"
        )
    if not INTERPRETED and not device_supported(q.device):
        raise BackendUnavailableError(
            f"the fused Triton kernel cannot run on {q.device}: it needs an NVIDIA GPU with compute capability "
            ">= 8.0 (or TRITON_INTERPRET=1 set before triton is imported, for CPU tensors); use backend='torch'"
        )
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if INTERPRETED:
        return launch_calibrated_attention(_calibrated_attn_fwd, q, k, v, c, out, n_sup, n_qry,
                                           config or INTERPRETER_CONFIG)
    with torch.cuda.device(q.device):
        if config is None:
            return launch_calibrated_attention(_calibrated_attn_fwd_tuned, q, k, v, c, out, n_sup, n_qry, None)
        return launch_calibrated_attention(_calibrated_attn_fwd, q, k, v, c, out, n_sup, n_qry, config)
