"""The host's CPU and ISA features, as every report names them."""

from __future__ import annotations

import re

import pytest
import torch

from fssam_deploy import hostinfo
from fssam_deploy.hostinfo import ISA_FEATURES, cpu_info, host_summary, isa_summary


def test_cpu_info_is_complete_and_cached():
    info = cpu_info()
    assert isinstance(info["model"], str) and info["model"]
    assert set(info["features"]) == set(ISA_FEATURES)
    assert cpu_info() is info  # py-cpuinfo runs once per process


def test_features_agree_with_torch():
    cap, f = (torch.backends.cpu.get_cpu_capability() or "").upper(), cpu_info()["features"]
    if cap.startswith("AVX512"):
        assert f["avx512f"] and f["avx2"]
    elif cap == "AVX2":
        assert f["avx2"] and not f["avx512f"]
    if f["amx_bf16"] or f["amx_int8"]:
        assert f["amx_tile"]


@pytest.mark.parametrize(("on", "text"), [
    ({"avx2", "fma"}, "AVX2, FMA; no AVX-512, no AMX"),
    ({"avx2", "fma", "avx512f", "avx512_vnni"}, "AVX2, FMA, AVX-512, AVX512-VNNI; no AVX512-BF16, no AMX"),
    (set(ISA_FEATURES), "AVX2, FMA, AVX-512, AVX512-VNNI, AVX-VNNI, AVX512-BF16, AMX, AMX-BF16, AMX-INT8"),
    (set(), "no AVX2; no AVX-512, no AMX"),
])
def test_isa_summary(on, text):
    assert isa_summary({f: f in on for f in ISA_FEATURES}) == text


def test_host_summary_line():
    line = host_summary(threads=2)
    assert re.fullmatch(r".+ \(\S+; .+\), 2 threads", line), line
    assert line.startswith(cpu_info()["model"])
    assert host_summary(threads=1).endswith(", 1 thread")


def test_cpuid_flag_spellings(monkeypatch):
    """py-cpuinfo's CPUID path spells 'avx512vnni' where Linux says 'avx512_vnni'."""
    monkeypatch.setattr(hostinfo, "_cpuinfo", lambda: {"flags": ["avx2", "avx512f", "avx512vnni"],
                                                       "brand_raw": "Test CPU", "arch_string_raw": "x86_64"})
    info = cpu_info.__wrapped__()
    assert info["model"] == "Test CPU" and info["source"] == "py-cpuinfo"
    assert {f for f, on in info["features"].items() if on} == {"avx2", "avx512f", "avx512_vnni"}


def test_without_py_cpuinfo_torch_decides(monkeypatch):
    monkeypatch.setattr(hostinfo, "_cpuinfo", lambda: {})
    monkeypatch.setattr(hostinfo, "_torch_capability", lambda: "AVX512")
    info = cpu_info.__wrapped__()
    assert info["features"]["avx512f"] and info["features"]["avx2"] and not info["features"]["amx_tile"]
    assert "pip install py-cpuinfo" in info["source"]


@pytest.mark.parametrize(("flags", "machine", "saturates"), [
    (["avx2", "fma"], "x86_64", True),  # u8 x s8 pairs summed in int16 (vpmaddubsw)
    (["avx2", "avx512f"], "x86_64", True),  # AVX-512 without VNNI: the same
    (["avx2", "avx512f", "avx512vnni"], "x86_64", False),
    (["avx2", "avx_vnni"], "x86_64", False),
    (["avx2", "amx_tile", "amx_int8"], "x86_64", False),
    ([], "aarch64", False),
])
def test_int8_dot_saturates(monkeypatch, flags, machine, saturates):
    monkeypatch.setattr(hostinfo, "cpu_info", lambda: {**cpu_info(), "features": {
        f: f.replace("_", "") in {x.replace("_", "") for x in flags} for f in ISA_FEATURES}})
    monkeypatch.setattr(hostinfo.platform, "machine", lambda: machine)
    assert hostinfo.int8_dot_saturates() is saturates
