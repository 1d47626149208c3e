"""benchmarks/diagnose_aoti.py: builds and loads AOTInductor packages in child processes and reports crashes."""

from __future__ import annotations

import importlib.util
import json
import signal
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "diagnose_aoti.py"


@pytest.fixture(scope="module")
def diag():
    spec = importlib.util.spec_from_file_location("diagnose_aoti", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
