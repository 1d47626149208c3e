"""What the host CPU is and which of the ISA features that decide CPU inference speed it has.

`cpu_info()` reads the CPU with py-cpuinfo (the model name and the kernel's feature flags), adds what torch
(`torch.backends.cpu.get_cpu_capability()`, the vector ISA its kernels dispatch to) reports, and caches it for
the process: py-cpuinfo probes CPUID in a subprocess (1.5 s on an idle 2-core EPYC). `openvino_capabilities()`
is what OpenVINO's CPU plugin will use (FP32, BF16, INT8, ...; it imports OpenVINO, so it is separate).
`host_summary()` is the one line every report names the machine with, e.g.
"AMD EPYC (x86_64; AVX2, FMA; no AVX-512, no AMX), 2 threads".
"""

from __future__ import annotations

import functools
import platform

import torch

# the features that matter, in the order reports list them: flag name (py-cpuinfo / Linux) -> display name
ISA_FEATURES = {
    "avx2": "AVX2",
    "fma": "FMA",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX512-VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX512-BF16",
    "amx_tile": "AMX",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
}


def _normalise(flag: str) -> str:
    """py-cpuinfo spells some flags without the underscore Linux uses (CPUID path: 'avx512vnni')."""
    return flag.lower().replace("_", "").replace("-", "")


@functools.cache
def _cpuinfo() -> dict:
    try:
        import cpuinfo
    except ImportError:
        return {}
    try:
        return cpuinfo.get_cpu_info()
    except Exception:  # py-cpuinfo probes many sources; an unknown platform must not break a report
        return {}


@functools.cache
def openvino_capabilities() -> tuple[str, ...] | None:
    """OpenVINO's CPU plugin `OPTIMIZATION_CAPABILITIES` (e.g. ('FP32', 'INT8', 'BIN', 'EXPORT_IMPORT'); 'BF16'
    when it runs bf16 natively), None when OpenVINO is not installed; cached."""
    try:
        import openvino
    except ImportError:
        return None
    try:
        return tuple(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # no CPU plugin in this build
        return None


def _torch_capability() -> str | None:
    try:
        return torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", "DEFAULT", "ZVECTOR", ...
    except Exception:
        return None


@functools.cache
def cpu_info() -> dict:
    """{"model", "arch", "vendor", "features": {flag: bool for each of ISA_FEATURES}, "torch_capability",
    "source"}; cached for the process.

    Features come from py-cpuinfo's flags; without py-cpuinfo only what torch's capability implies is known
    (AVX2 / AVX-512 yes or no, the rest False) and `source` says so.
    """
    info = _cpuinfo()
    torch_cap = _torch_capability()
    if info.get("flags"):
        flags = {_normalise(f) for f in info["flags"]}
        features = {name: _normalise(name) in flags for name in ISA_FEATURES}
        source = "py-cpuinfo"
    else:
        cap = (torch_cap or "").upper()
        features = dict.fromkeys(ISA_FEATURES, False)
        features["avx2"] = cap.startswith(("AVX2", "AVX512"))
        features["fma"] = features["avx2"]
        features["avx512f"] = cap.startswith("AVX512")
        source = "torch (py-cpuinfo not installed: pip install py-cpuinfo)"
    return {"model": info.get("brand_raw") or platform.processor() or platform.machine() or "unknown CPU",
            "arch": info.get("arch_string_raw") or platform.machine(),
            "vendor": info.get("vendor_id_raw"),
            "features": features,
            "torch_capability": torch_cap,
            "source": source}


def isa_summary(features: dict[str, bool]) -> str:
    """"AVX2, FMA; no AVX-512, no AMX" from `cpu_info()["features"]`: what it has, then the missing families."""
    have = [ISA_FEATURES[f] for f, on in features.items() if on and f in ISA_FEATURES]
    missing = []
    if not features.get("avx512f"):
        missing.append("no AVX-512")
    else:
        missing += [f"no {ISA_FEATURES[f]}" for f in ("avx512_vnni", "avx512_bf16") if not features.get(f)]
    if not features.get("amx_tile"):
        missing.append("no AMX")
    else:
        missing += [f"no {ISA_FEATURES[f]}" for f in ("amx_bf16", "amx_int8") if not features.get(f)]
    return ", ".join(have or ["no AVX2"]) + ("; " + ", ".join(missing) if missing else "")


def host_summary(threads: int | None = None) -> str:
    """One line naming the machine: "AMD EPYC (x86_64; AVX2, FMA; no AVX-512, no AMX), 2 threads".

    `threads`: the thread count the measurement ran with (default: `torch.get_num_threads()`).
    """
    info = cpu_info()
    n = threads if threads is not None else torch.get_num_threads()
    return f"{info['model']} ({info['arch']}; {isa_summary(info['features'])}), {n} thread{'s' if n != 1 else ''}"


def cpu_name() -> str:
    """The CPU's model name (py-cpuinfo), e.g. for a manifest or a report."""
    return cpu_info()["model"]


def int8_dot_saturates() -> bool:
    """Whether ONNX Runtime's u8 x s8 int8 GEMM (MLAS) can saturate here: on x86 CPUs without VNNI (AVX2, or
    AVX-512 without VNNI) it sums pairs of u8*s8 products in int16 (vpmaddubsw), which overflows for large
    activations times large weights. VNNI / AMX-INT8 accumulate in int32; other architectures are not x86."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    features = cpu_info()["features"]
    return not any(features.get(f) for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
