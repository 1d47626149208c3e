"""Checks before the expensive work: devices, integer flags, choices, writable folders."""

from __future__ import annotations

import pytest
import torch

from fssam_deploy.errors import ConfigError
from fssam_deploy.preflight import check_choices, check_device, check_positive, check_writable_folder, parse_int_list


def test_cpu_devices():
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(" cpu:0 ") == torch.device("cpu:0")
    with pytest.raises(ConfigError, match=r"--device 'cpu:3': there is one CPU device; use cpu"):
        check_device("cpu:3")


@pytest.mark.parametrize("device,match", [
    ("tpu", r"--device 'tpu': not a device; use cpu, cuda or cuda:N"),
    ("cuda:x", r"--device 'cuda:x': not a device"),
    ("", r"--device '': not a device"),
    ("mps", r"--device 'mps': device type 'mps' is not supported; use cpu, cuda or cuda:N"),
    ("meta", r"--device 'meta': device type 'meta' is not supported"),
])
def test_unknown_devices(device, match):
    """Issue 16: `--device tpu` ended in a traceback."""
    with pytest.raises(ConfigError, match=match):
        check_device(device)


def test_cuda_without_a_gpu(monkeypatch):
    """Issue 16: `--device cuda` on a machine without a GPU ended in a traceback after the model was built."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"--device 'cuda': no CUDA GPU is visible \(torch .*\); use --device cpu"):
        check_device("cuda")


def test_cuda_index_beyond_the_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda:1")
    assert check_device("cuda") == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"--device 'cuda:7': this machine has 2 CUDA device\(s\) "
                                          r"\(cuda:0\.\.cuda:1\)"):
        check_device("cuda:7")


@pytest.mark.parametrize("value,match", [(0, r"--batch 0: must be >= 1"), (-1, r"--batch -1: must be >= 1"),
                                         ("abc", r"--batch 'abc': not a whole number"),
                                         (1.5, r"--batch 1\.5: not a whole number"),
                                         (None, r"--batch None: not a whole number"),
                                         (True, r"--batch True: not a whole number")])
def test_check_positive_refuses(value, match):
    with pytest.raises(ConfigError, match=match):
        check_positive("--batch", value)


def test_check_positive_accepts():
    assert check_positive("--batch", "3") == 3
    assert check_positive("--iters", 0, minimum=0) == 0


@pytest.mark.parametrize("text", ["abc", "1,,2", "", "1,0", "2,x", "-1"])
def test_parse_int_list_refuses(text):
    """Issue 16: `fssam build --batch abc` ended in a ValueError traceback."""
    with pytest.raises(ConfigError, match=r"--batch .*(give comma-separated integers|integer >= 1)"):
        parse_int_list("--batch", text)


def test_parse_int_list_accepts():
    assert parse_int_list("--batch", "1, 2,4") == [1, 2, 4]


def test_check_choices():
    """Issue 16: `fssam demo --backends nope` failed after 24 s of work."""
    assert check_choices("--backends", ["torch"], ["torch", "onnxruntime"]) == ["torch"]
    with pytest.raises(ConfigError, match=r"--backends: unknown 'nope'; choose from torch, onnxruntime"):
        check_choices("--backends", ["torch", "nope"], ["torch", "onnxruntime"])
    with pytest.raises(ConfigError, match=r"--backends: empty; choose from torch"):
        check_choices("--backends", [], ["torch"])


def test_check_writable_folder(tmp_path):
    check_writable_folder(tmp_path / "new" / "deeper", "--out x")
    assert not (tmp_path / "new").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"--out x: cannot create folder .*f/sub: .*f is a file, not a folder"):
        check_writable_folder(tmp_path / "f" / "sub", "--out x")
    assert list(p.name for p in tmp_path.iterdir()) == ["f"]  # the probe left nothing
