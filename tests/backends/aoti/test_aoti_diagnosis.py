"""benchmarks/diagnose_aoti.py: builds and loads AOTInductor packages in child processes and reports crashes."""

from __future__ import annotations

import json
import signal
import sys

import pytest

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def diag():
    return load_benchmark("diagnose_aoti")


def test_a_crashing_child_is_reported_with_its_signal_and_backtrace(diag):
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    result = diag._run(crash, timeout=120)
    assert result["rc"] == -signal.SIGSEGV and result["signal"] == "SIGSEGV"
    trace = diag._gdb_backtrace(crash, timeout=300)
    if trace is not None:  # gdb installed
        assert "SIGSEGV" in trace


def test_cpu_linear_package_builds_loads_and_matches(diag, tmp_path):
    out = tmp_path / "diag.json"
    assert diag.main(["--device", "cpu", "--cases", "linear", "--loaders", "default", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["summary"] == {"linear": {"build": 0, "load:default": 0}}
    assert report["environment"]["torch"] and "max_abs_err" in report["cases"]["linear"]["load:default"]["stdout_tail"]


def test_unknown_case_is_refused(diag):
    with pytest.raises(SystemExit):
        diag.main(["--cases", "nope"])
