"""The fused calibrated attention as a TensorRT plugin (`tensorrt.plugin`, ahead-of-time kernel).

In an ONNX graph the plugin is one node (see `onnx.plugin_variant`):

    fssam::CalibratedAttention(q, k, v, c) -> out    attributes n_sup, n_qry (ints),
                                                        plugin_namespace = "fssam", aot = 1

TensorRT's ONNX parser finds the plugin `fssam::CalibratedAttention` registered by
`register_plugin()` (op_type = plugin name, `plugin_namespace` = namespace) and, with `aot=1`,
asks for its ahead-of-time implementation: Triton compiles the kernel to PTX at engine build
time, TensorRT embeds it, and the engine then runs without Python (e.g. `trtexec --loadEngine`).

TensorRT launches an AOT kernel with its arguments in this order: the input pointers, the int32
scalars the plugin returns ("extra args"), the output pointers. `_calibrated_attn_fwd` takes
(Q, K, V, C, Out, strides..., lengths...), so `_calibrated_attn_trt` below is a thin Triton
entry point in TensorRT's order that calls it with the strides of contiguous tensors (TensorRT
hands a plugin LINEAR, i.e. contiguous, tensors): 4 pointers, 5 int32 (H, N_Q, N_K, N_SUP, N_QRY),
1 pointer. The head dim, the softmax scale and the tiles are constexprs baked into the PTX.

Everything TensorRT-independent is a plain function here (shape/type inference, attribute
checks, constexprs, grid, extra args, tactics), so it is tested without TensorRT; the
`tensorrt.plugin` definitions are made only by `register_plugin()`, which needs TensorRT >= 10.9.
Without TensorRT (or without Triton) this module still imports.
"""

import hashlib
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

from fssam_deploy.errors import BackendUnavailableError, InputError
from fssam_deploy.kernels.checks import SUPPORTED_HEAD_DIMS
from fssam_deploy.onnx.plugin_variant import PARSER_ATTRS, PLUGIN_ATTRS, PLUGIN_ID, PLUGIN_NAME, PLUGIN_NAMESPACE  # noqa: F401

try:
    import triton
    import triton.language as tl

    from fssam_deploy.kernels.triton_calibrated_attention import INTERPRETED, KernelConfig, _calibrated_attn_fwd
except ImportError:  # no Triton: the pure functions below still work
    triton = None
    INTERPRETED = False

    @dataclass(frozen=True)
    class KernelConfig:  # same fields as triton_calibrated_attention.KernelConfig
        block_m: int = 64
        block_n: int = 64
        num_warps: int = 4
        num_stages: int = 2


#: Order of the kernel's int32 scalars, between the input and the output pointers.
EXTRA_ARGS = ("H", "N_Q", "N_K", "N_SUP", "N_QRY")
#: Without an opt-in attribute on the kernel, CUDA launches at most 48 KiB of dynamic shared memory.
#: Whether TensorRT sets that attribute for AOT plugin kernels is unverified, so tactics stay below.
DEFAULT_MAX_SHARED_BYTES = 48 * 1024

_TRT_TYPES = ("FP32", "FP16", "BF16")
_TRITON_TYPES = {"FP32": "fp32", "FP16": "fp16", "BF16": "bf16"}
_ELEM_BYTES = {"FP32": 4, "FP16": 2, "BF16": 2}
#: Candidate launch configurations; a tactic id is the key. fp32 runs IEEE dots (small tiles only).
TACTICS = {
    1: KernelConfig(16, 16, num_warps=4, num_stages=1),
    2: KernelConfig(16, 32, num_warps=4, num_stages=1),
    3: KernelConfig(32, 32, num_warps=4, num_stages=1),
    4: KernelConfig(64, 32, num_warps=4, num_stages=1),
    5: KernelConfig(64, 64, num_warps=4, num_stages=2),
    6: KernelConfig(64, 64, num_warps=8, num_stages=2),
    7: KernelConfig(128, 64, num_warps=8, num_stages=2),
}
_TACTICS_BY_TYPE = {"FP32": (1, 2), "FP16": (2, 3, 4, 5, 6, 7), "BF16": (2, 3, 4, 5, 6, 7)}


# ------------------------------------------------------------------------------- pure functions


def _dim(x):
    """An int for ints and constant TensorRT shape expressions, else None (dynamic or not yet known)."""
    if isinstance(x, int):
        return x if x >= 0 else None
    if getattr(x, "is_fake", False) or not getattr(x, "is_constant", False):
        return None
    return int(x.constant_value())


def output_shape(q_shape, k_shape, v_shape, c_shape, n_sup: int, n_qry: int) -> tuple:
    """The plugin's output shape (q's), after checking the inputs' ranks and every dim that is known.

    Shapes are tuples of ints (-1 or None for dynamic) or TensorRT shape expressions.
    """
    check_node_attrs({"n_sup": n_sup, "n_qry": n_qry})
    for name, shape, rank in (("q", q_shape, 4), ("k", k_shape, 4), ("v", v_shape, 4), ("c", c_shape, 3)):
        if len(shape) != rank:
            raise InputError(f"{PLUGIN_ID}: input {name} has rank {len(shape)}, expected {rank} "
                             "(q (B, H, Nq, D), k and v (B, H, Nk, D), c (B, H, n_qry))")
    q, k, v, c = ([_dim(d) for d in s] for s in (q_shape, k_shape, v_shape, c_shape))
    same = [("k[1]", k[1], "q[1]", q[1]), ("k[3]", k[3], "q[3]", q[3]), ("c[1]", c[1], "q[1]", q[1]),
            ("c[2]", c[2], "n_qry", n_qry)] + [(f"v[{i}]", v[i], f"k[{i}]", k[i]) for i in range(1, 4)]
    for a_name, a, b_name, b in same:
        if a is not None and b is not None and a != b:
            raise InputError(f"{PLUGIN_ID}: {a_name} = {a} but {b_name} = {b} "
                             f"(q {tuple(q)}, k {tuple(k)}, v {tuple(v)}, c {tuple(c)}; None = dynamic)")
    if q[3] is not None and q[3] not in SUPPORTED_HEAD_DIMS:
        raise InputError(f"{PLUGIN_ID}: head dim {q[3]} (q {tuple(q)}) is not one the kernel is built for "
                         f"{SUPPORTED_HEAD_DIMS}; export the graph without the plugin")
    if k[2] is not None and n_sup + n_qry > k[2]:
        raise InputError(f"{PLUGIN_ID}: n_sup + n_qry = {n_sup + n_qry} exceeds the {k[2]} keys of k {tuple(k)}")
    return tuple(q_shape)


def output_dtype(q_dtype: str, k_dtype: str, v_dtype: str, c_dtype: str) -> str:
    """The output type (q's), given TensorRT type names ("FP32", "FP16", "BF16")."""
    for name, dt in (("q", q_dtype), ("k", k_dtype), ("v", v_dtype), ("c", c_dtype)):
        if dt not in _TRT_TYPES:
            raise InputError(f"{PLUGIN_ID}: input {name} has type {dt}, the kernel reads {_TRT_TYPES}")
    if not q_dtype == k_dtype == v_dtype:
        raise InputError(f"{PLUGIN_ID}: q, k, v must share one type, got {q_dtype}, {k_dtype}, {v_dtype}")
    return q_dtype


def check_node_attrs(attrs: dict) -> None:
    """Raise InputError unless `attrs` holds the plugin's attributes as ints: n_sup >= 0, n_qry >= 1."""
    missing = [a for a in PLUGIN_ATTRS if a not in attrs]
    if missing:
        raise InputError(f"{PLUGIN_ID}: node attributes {missing} are missing (got {sorted(attrs)})")
    for name in PLUGIN_ATTRS:
        val = attrs[name]
        if isinstance(val, bool) or not isinstance(val, int):
            raise InputError(f"{PLUGIN_ID}: attribute {name} must be an int, got {type(val).__name__} ({val!r})")
    if attrs["n_sup"] < 0 or attrs["n_qry"] < 1:
        raise InputError(f"{PLUGIN_ID}: needs n_sup >= 0 and n_qry >= 1, got n_sup={attrs['n_sup']}, "
                         f"n_qry={attrs['n_qry']}")


def kernel_constexprs(head_dim: int, config: KernelConfig) -> dict:
    """The constexprs baked into the PTX for one head dim and launch configuration."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise InputError(f"{PLUGIN_ID}: head dim {head_dim} not in {SUPPORTED_HEAD_DIMS}")
    return {"HEAD_DIM": head_dim, "SM_SCALE": 1.0 / math.sqrt(head_dim), "BLOCK_M": config.block_m,
            "BLOCK_N": config.block_n}


def _int_cdiv(a, b):
    return (a + b - 1) // b


def launch_grid(q_shape, block_m: int, cdiv=_int_cdiv) -> tuple:
    """(cdiv(Nq, BLOCK_M), B * H, 1); ints or shape expressions (pass `tensorrt.plugin.cdiv`)."""
    b, h, n_q, _ = q_shape
    return cdiv(n_q, block_m), b * h, 1


def block_size(config: KernelConfig) -> tuple:
    """Threads per block: (num_warps * 32, 1, 1)."""
    return config.num_warps * 32, 1, 1


def extra_args(q_shape, k_shape, n_sup, n_qry) -> tuple:
    """The kernel's int32 scalars in order EXTRA_ARGS: H, N_Q, N_K, N_SUP, N_QRY."""
    return q_shape[1], q_shape[2], k_shape[2], n_sup, n_qry


def estimated_shared_bytes(config: KernelConfig, head_dim: int, trt_type: str) -> int:
    """Upper estimate of a config's shared memory: the q tile plus `num_stages` K and V tiles."""
    elem = _ELEM_BYTES[trt_type]
    return (config.block_m * head_dim + 2 * config.num_stages * config.block_n * head_dim) * elem


def plugin_tactics(trt_type: str, head_dim: int, n_q: int | None, max_shared: int = DEFAULT_MAX_SHARED_BYTES) -> list:
    """Tactic ids worth timing for q's type and shape: shared memory within `max_shared`, BLOCK_M <= Nq.

    The smallest config of the type is always kept, so there is at least one tactic.
    """
    if trt_type not in _TACTICS_BY_TYPE:
        raise InputError(f"{PLUGIN_ID}: type {trt_type} is not one of {_TRT_TYPES}")
    ids = _TACTICS_BY_TYPE[trt_type]
    max_m = max(16, 1 << (n_q - 1).bit_length()) if n_q else 1 << 30
    kept = [t for t in ids if estimated_shared_bytes(TACTICS[t], head_dim, trt_type) <= max_shared
            and TACTICS[t].block_m <= max_m]
    return kept or [min(ids, key=lambda t: estimated_shared_bytes(TACTICS[t], head_dim, trt_type))]


def type_combinations() -> list:
    """(io types string, q type) per combination: q, k, v and out share a type; c is independent."""
    c_types = "*".join(_TRT_TYPES)
    return [(f"{t}, {t}, {t}, {c_types}, {t}", t) for t in _TRT_TYPES]


def kernel_source_sha256() -> str:
    """sha256 of the kernel sources the plugin compiles (a timing cache is stale when they change)."""
    digest = hashlib.sha256()
    kernel = importlib.util.find_spec("fssam_deploy.kernels.triton_calibrated_attention").origin  # not imported
    for path in (Path(kernel), Path(__file__)):
        digest.update(path.read_bytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------- kernel (Triton)

if triton is not None:

    @triton.jit
    def _calibrated_attn_trt(
        Q, K, V, C,  #
        H, N_Q, N_K, N_SUP, N_QRY,  #
        Out,  #
        HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
    ):
        """TensorRT's argument order (inputs, int32 scalars, output) over contiguous (B, H, N, D) tensors."""
        _calibrated_attn_fwd(
            Q, K, V, C, Out,  #
            H * N_Q * HEAD_DIM, N_Q * HEAD_DIM, HEAD_DIM, 1,  # q: (B, H, Nq, D)
            H * N_K * HEAD_DIM, N_K * HEAD_DIM, HEAD_DIM, 1,  # k: (B, H, Nk, D)
            H * N_K * HEAD_DIM, N_K * HEAD_DIM, HEAD_DIM, 1,  # v: (B, H, Nk, D)
            H * N_QRY, N_QRY, 1,  # c: (B, H, n_qry)
            H * N_Q * HEAD_DIM, N_Q * HEAD_DIM, HEAD_DIM, 1,  # out: (B, H, Nq, D)
            H, N_Q, N_K, N_SUP, N_QRY,  #
            HEAD_DIM, SM_SCALE, BLOCK_M, BLOCK_N,
        )


def _need_triton(what: str) -> None:
    if triton is None:
        raise BackendUnavailableError(f"{what} needs Triton: pip install triton")


def launch_like_tensorrt(q, k, v, c, n_sup: int, n_qry: int, config: KernelConfig):
    """Run `_calibrated_attn_trt` exactly as TensorRT would launch the plugin (argument order, grid,
    constexprs from the functions above), through Triton's launcher. For tests of the plugin's ABI."""
    _need_triton("launch_like_tensorrt")
    import torch

    out = torch.empty_like(q)
    grid = launch_grid(tuple(q.shape), config.block_m)
    args = extra_args(tuple(q.shape), tuple(k.shape), n_sup, n_qry)
    opts = {} if INTERPRETED else {"num_warps": config.num_warps, "num_stages": config.num_stages}
    _calibrated_attn_trt[grid](q.contiguous(), k.contiguous(), v.contiguous(), c.contiguous(), *args, out,
                               **kernel_constexprs(q.shape[-1], config), **opts)
    return out


def compile_plugin_kernel(trt_type: str, c_type: str, head_dim: int, config: KernelConfig, arch: int):
    """`triton.compile` of `_calibrated_attn_trt` for compute capability `arch`: Triton's CompiledKernel
    (`asm["ptx"]`, `metadata.name`, `metadata.shared`). Needs no GPU; not under TRITON_INTERPRET."""
    _need_triton("compile_plugin_kernel")
    if INTERPRETED:
        raise BackendUnavailableError("compiling the plugin kernel needs compiled Triton: unset TRITON_INTERPRET")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = kernel_constexprs(head_dim, config)
    signature = {name: "constexpr" for name in constexprs}
    for name in ("Q", "K", "V", "Out"):
        signature[name] = "*" + _TRITON_TYPES[trt_type]
    signature["C"] = "*" + _TRITON_TYPES[c_type]
    signature.update({name: "i32" for name in EXTRA_ARGS})
    names = _calibrated_attn_trt.arg_names
    signature = {name: signature[name] for name in names}
    attrs = {(names.index(p),): [["tt.divisibility", 16]] for p in ("Q", "K", "V", "C", "Out")}
    src = ASTSource(_calibrated_attn_trt, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


# ------------------------------------------------------------------------------ tensorrt.plugin

_STATE = {"registered": False, "max_shared_bytes": DEFAULT_MAX_SHARED_BYTES}


def tensorrt_plugin_module():
    """`tensorrt.plugin`, checked to offer ahead-of-time plugins (TensorRT >= 10.9)."""
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise BackendUnavailableError("the TensorRT plugin needs TensorRT >= 10.9: pip install tensorrt") from exc
    if not hasattr(trtp, "aot_impl") or not hasattr(trt, "QuickPluginCreationRequest"):
        raise BackendUnavailableError(f"TensorRT {trt.__version__} has no ahead-of-time Python plugins "
                                      "(tensorrt.plugin.aot_impl, TensorRT >= 10.9); upgrade, or build without "
                                      "the plugin (plugin=False, `--no-plugin`)")
    return trt, trtp


def register_plugin(max_shared_bytes: int = DEFAULT_MAX_SHARED_BYTES) -> None:
    """Define `fssam::CalibratedAttention` in `tensorrt.plugin` (shape/type function, autotune, AOT
    kernel). Call before parsing an ONNX graph that holds the node; calling again only updates
    `max_shared_bytes`, the shared-memory limit of the tactics offered (see DEFAULT_MAX_SHARED_BYTES).
    Raises BackendUnavailableError without TensorRT >= 10.9 or without compiled Triton.
    """
    trt, trtp = tensorrt_plugin_module()
    _need_triton("the TensorRT plugin")
    if INTERPRETED:
        raise BackendUnavailableError("the TensorRT plugin compiles its kernel: unset TRITON_INTERPRET")
    _STATE["max_shared_bytes"] = int(max_shared_bytes)
    if not _STATE["registered"]:
        _define(trt, trtp)
        _STATE["registered"] = True


def _type_name(trt, dtype) -> str:
    names = {trt.float32: "FP32", trt.float16: "FP16", trt.bfloat16: "BF16"}
    if dtype not in names:
        raise InputError(f"{PLUGIN_ID}: TensorRT type {dtype} is not one the kernel reads ({_TRT_TYPES})")
    return names[dtype]


def _device_arch() -> int:
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError("building the TensorRT plugin needs a CUDA GPU (its PTX is per architecture)")
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


_KERNELS: dict = {}


def _kernel(trt_type: str, c_type: str, head_dim: int, tactic: int, arch: int):
    key = (trt_type, c_type, head_dim, tactic, arch)
    if key not in _KERNELS:
        _KERNELS[key] = compile_plugin_kernel(trt_type, c_type, head_dim, TACTICS[tactic], arch)
    return _KERNELS[key]


def _define(trt, trtp) -> None:
    # tensorrt.plugin reads these functions' annotations: they must be real classes (no postponed
    # evaluation in this module), hence the definitions live here, after tensorrt is imported.
    @trtp.register(PLUGIN_ID)
    def _describe(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, c: trtp.TensorDesc, n_sup: int,
                  n_qry: int) -> trtp.TensorDesc:
        output_shape(q.shape_expr, k.shape_expr, v.shape_expr, c.shape_expr, int(n_sup), int(n_qry))
        output_dtype(*(_type_name(trt, x.dtype) for x in (q, k, v, c)))
        return q.like()

    @trtp.autotune(PLUGIN_ID)
    def _autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, c: trtp.TensorDesc,
                  outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
        head_dim, n_q = int(q.shape[3]), int(q.shape[2])
        return [trtp.AutoTuneCombination(types, "LINEAR",
                                         plugin_tactics(t, head_dim, n_q if n_q > 0 else None,
                                                        _STATE["max_shared_bytes"]))
                for types, t in type_combinations()]

    @trtp.aot_impl(PLUGIN_ID)
    def _aot_impl(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, c: trtp.TensorDesc, n_sup: int,
                  n_qry: int, outputs: tuple[trtp.TensorDesc], tactic: int
                  ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        if tactic not in TACTICS:
            raise InputError(f"{PLUGIN_ID}: unknown tactic {tactic}; known {sorted(TACTICS)}")
        config = TACTICS[tactic]
        kernel = _kernel(_type_name(trt, q.dtype), _type_name(trt, c.dtype), int(q.shape[3]), tactic, _device_arch())
        if kernel.metadata.shared > _STATE["max_shared_bytes"]:
            raise InputError(f"{PLUGIN_ID}: tactic {tactic} ({config}) needs {kernel.metadata.shared} bytes of shared "
                             f"memory, above the limit {_STATE['max_shared_bytes']}; lower the tiles")
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = launch_grid(q.shape_expr, config.block_m, cdiv=trtp.cdiv)
        params.block_x, params.block_y, params.block_z = block_size(config)
        params.shared_mem = kernel.metadata.shared
        scalars = extra_args(q.shape_expr, k.shape_expr, int(n_sup), int(n_qry))
        args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(x) for x in scalars])
        return kernel.metadata.name, kernel.asm["ptx"], params, args
