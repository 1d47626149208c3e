"""`fssam verify` over OpenVINO IR folders: the reader of the folder's precision by default, `--backend` for a
runtime hint, each held to the targets of the precision it computes in."""

from __future__ import annotations

import warnings

import pytest

from fssam_deploy.errors import ConfigError
from fssam_deploy.verify import verify


def _verify(folder, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return verify(folder, batch=1, reps=1, **kw)


def test_fp32_ir(ov_fp32):
    r = _verify(ov_fp32)
    assert (r.backend, r.precision, r.passed) == ("openvino", "fp32", True)
    assert all(row["target"].startswith("<= ") for row in r.rows)  # fp32: per-stage tolerances, not just finite
    assert r.episode["iou"] >= 0.999


def test_bf16_hint_over_fp32_ir(ov_fp32):
    """openvino-bf16 over the same IR: bf16's targets (the episode IoU decides), and the table names it."""
    r = _verify(ov_fp32, backend="openvino-bf16")
    assert (r.backend, r.precision, r.passed) == ("openvino-bf16", "bf16", True)
    assert all(row["target"] == "finite" for row in r.rows) and r.episode["target"] == "IoU >= 0.98"
    assert r.table().startswith("backend openvino-bf16, precision bf16; ")  # no ONNX emulation remark


def test_int8_ir_runs_its_own_reader(ov_int8):
    r = _verify(ov_int8)
    assert (r.backend, r.precision, r.passed) == ("openvino-int8", "int8", True)
    r = _verify(ov_int8, backend="openvino-int8-bf16")
    assert (r.backend, r.precision, r.passed) == ("openvino-int8-bf16", "int8", True)


def test_backend_that_does_not_read_the_folder(ov_int8, tiny_graphs):
    with pytest.raises(ConfigError, match=r"--backend openvino: does not run .* \(a fssam-openvino/1 folder of "
                                          r"precision int8\); the backends that do: openvino-int8, "
                                          r"openvino-int8-bf16"):
        _verify(ov_int8, backend="openvino")
    with pytest.raises(ConfigError, match=r"--backend openvino-bf16: does not run .*fssam-onnx/1 folder"):
        _verify(tiny_graphs, backend="openvino-bf16")
