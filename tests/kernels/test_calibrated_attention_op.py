"""The torch.library op `fssam::calibrated_attention` and the `calibrated_attention` dispatcher."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fssam_deploy.kernels as kernels
from fssam_deploy.errors import BackendUnavailableError, ConfigError
from fssam_deploy.kernels import calibrated_attention, calibrated_attention_reference
from fssam_deploy.kernels.op import OP_NAME, calibrated_attention_op

REPO = Path(__file__).resolve().parents[2]
TOL = dict(atol=1e-5, rtol=1e-5)


def _cpu_inputs(make_inputs, **kw):
    return make_inputs(device="cpu", **kw)


def test_op_is_registered_with_the_schema():
    op = torch.ops.fssam.calibrated_attention.default
    assert OP_NAME == "fssam::calibrated_attention"
    # torch 2.11's triton_op infers the schema from the annotations (int -> SymInt); later releases take ours.
    assert str(op._schema).replace("SymInt", "int") == (
        "fssam::calibrated_attention(Tensor q, Tensor k, Tensor v, Tensor c, int n_sup, int n_qry) -> Tensor"
    )


def test_op_on_cpu_is_the_reference(make_inputs):
    q, k, v, c = _cpu_inputs(make_inputs, b=2, n_q=24, d=32, n_sup=16, n_qry=16, rest=4)
    out = torch.ops.fssam.calibrated_attention(q, k, v, c, 16, 16)
    torch.testing.assert_close(out, calibrated_attention_reference(q, k, v, c, 16, 16), atol=0, rtol=0)
    torch.testing.assert_close(calibrated_attention_op(q, k, v, c, 16, 16), out, atol=0, rtol=0)


def test_opcheck(make_inputs):
    q, k, v, c = _cpu_inputs(make_inputs, n_q=8, d=32, n_sup=8, n_qry=8, rest=2)
    torch.library.opcheck(torch.ops.fssam.calibrated_attention.default, (q, k, v, c, 8, 8))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fake_impl_propagates_shape_dtype_device(device):
    # Fake CUDA tensors need no GPU: this runs the op's CUDA branch as a fake kernel.
    with FakeTensorMode():
        q = torch.empty(2, 1, 40, 64, dtype=torch.float16, device=device)
        k = torch.empty(2, 1, 90, 64, dtype=torch.float16, device=device)
        c = torch.empty(2, 1, 40, device=device)
        out = torch.ops.fssam.calibrated_attention(q, k, k, c, 40, 40)
    assert out.shape == (2, 1, 40, 64) and out.dtype == torch.float16 and out.device.type == device


def test_torch_compile_sees_the_op(make_inputs):
    q, k, v, c = _cpu_inputs(make_inputs, n_q=8, d=32, n_sup=8, n_qry=8, rest=2)

    def f(q, k, v, c):
        return torch.ops.fssam.calibrated_attention(q, k, v, c, 8, 8) * 2.0

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, c), f(q, k, v, c), **TOL)


def test_export_keeps_one_custom_node(make_inputs):
    q, k, v, c = _cpu_inputs(make_inputs, n_q=8, d=32, n_sup=8, n_qry=8, rest=2)

    class Attn(torch.nn.Module):
        def forward(self, q, k, v, c):
            return torch.ops.fssam.calibrated_attention(q, k, v, c, 8, 8)

    ep = torch.export.export(Attn(), (q, k, v, c))
    targets = [node.target for node in ep.graph.nodes if node.op == "call_function"]
    assert targets == [torch.ops.fssam.calibrated_attention.default]
    torch.testing.assert_close(ep.module()(q, k, v, c), calibrated_attention_reference(q, k, v, c, 8, 8), **TOL)


# ------------------------------------------------------------------------------------- dispatcher


@pytest.mark.parametrize("backend", ["auto", "torch", "op", "triton"])
def test_dispatch_backends_agree(make_inputs, kernel_device, backend):
    q, k, v, c = make_inputs(n_q=20, d=32, n_sup=16, n_qry=24, rest=3)
    out = calibrated_attention(q, k, v, c, 16, 24, backend=backend)
    assert out.device.type == kernel_device
    torch.testing.assert_close(out, calibrated_attention_reference(q, k, v, c, 16, 24), **TOL)


def test_auto_on_cpu_is_the_plain_reference(make_inputs):
    q, k, v, c = _cpu_inputs(make_inputs, n_q=8, d=48, n_sup=8, n_qry=8, rest=2)  # head dim the kernel lacks
    out = calibrated_attention(q, k, v, c, 8, 8)
    torch.testing.assert_close(out, calibrated_attention_reference(q, k, v, c, 8, 8), atol=0, rtol=0)


def test_unknown_backend():
    q = torch.zeros(1, 1, 4, 32)
    with pytest.raises(ConfigError, match="unknown backend 'cuda'; expected one of auto, torch, triton, op"):
        calibrated_attention(q, q, q, torch.zeros(1, 1, 2), 1, 2, backend="cuda")


def test_triton_available_under_the_interpreter_or_gpu(kernel_device):
    assert kernels.triton_available()


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_package_imports_without_triton():
    code = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
import fssam_deploy.kernels as K
from fssam_deploy.errors import BackendUnavailableError
assert "triton" not in [m for m in sys.modules if sys.modules[m] is not None]
assert not K.triton_available()
q, k, c = torch.randn(1, 1, 4, 32), torch.randn(1, 1, 10, 32), torch.rand(1, 1, 5)
ref = K.calibrated_attention(q, k, k, c, 5, 5, backend="torch")
assert torch.equal(K.calibrated_attention(q, k, k, c, 5, 5), ref)
assert torch.equal(K.calibrated_attention(q, k, k, c, 5, 5, backend="op"), ref)
try:
    K.calibrated_attention(q, k, k, c, 5, 5, backend="triton")
    raise SystemExit("no error")
except BackendUnavailableError as e:
    assert "pip install triton" in str(e)
from torch._subclasses.fake_tensor import FakeTensorMode
with FakeTensorMode():
    fq, fk, fc = torch.empty(1, 1, 4, 32, device="cuda"), torch.empty(1, 1, 10, 32, device="cuda"), torch.empty(1, 1, 5)
    assert torch.ops.fssam.calibrated_attention(fq, fk, fk, fc.cuda(), 5, 5).shape == (1, 1, 4, 32)
print("ok")
"""
    proc = _run_python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_triton_backend_on_cpu_without_interpreter_says_how_to_fix():
    code = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import torch
from fssam_deploy.kernels import calibrated_attention
q, k, c = torch.randn(1, 1, 4, 32), torch.randn(1, 1, 10, 32), torch.rand(1, 1, 5)
calibrated_attention(q, k, k, c, 5, 5, backend="triton")
"""
    proc = _run_python(code)
    assert proc.returncode != 0
    assert "BackendUnavailableError" in proc.stderr and "TRITON_INTERPRET=1" in proc.stderr
    assert BackendUnavailableError.__name__ in proc.stderr
