"""The kernel compiles ahead of time (as a TensorRT plugin would) and the autotune pruning keeps valid configs.

Compiling needs no GPU (Triton ships ptxas), but it needs the compiled kernel, not the interpreted
one, so it runs in a subprocess without TRITON_INTERPRET.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fssam_deploy.kernels.triton_calibrated_attention import (
    _autotune_configs,
    _max_shared_memory,
    _prune_configs,
    estimated_shared_memory,
)

REPO = Path(__file__).resolve().parents[2]

_AOT_SCRIPT = """
import json, torch
from fssam_deploy.kernels.aot import compile_calibrated_attention
from fssam_deploy.kernels.triton_calibrated_attention import KernelConfig
k = compile_calibrated_attention(torch.float16, 256, KernelConfig(64, 64, num_warps=8, num_stages=2), arch=90)
md = k.metadata
print(json.dumps(dict(name=md.name, shared=md.shared, scratch=md.global_scratch_size, tma=len(md.tensordesc_meta or []),
                      num_warps=md.num_warps, ptx_target=".target sm_90" in k.asm["ptx"],
                      wgmma="wgmma.mma_async" in k.asm["ptx"])))
"""


def test_aot_compile_for_sm90_head_dim_256_without_tma_or_scratch():
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["name"] == "_calibrated_attn_fwd" and info["num_warps"] == 8
    assert info["ptx_target"] and info["wgmma"]
    assert info["scratch"] == 0 and info["tma"] == 0  # nothing a TensorRT plugin would have to pass
    assert info["shared"] <= 227 * 1024  # fits an H100's opt-in shared memory per block
    assert info["shared"] <= estimated_shared_memory(64, 64, 2, 256, 2) * 1.05


def _pruned(dtype, head_dim, n_q=1024, n_k=2056):
    with FakeTensorMode():
        q = torch.empty(1, 1, n_q, head_dim, dtype=dtype, device="cuda")
        return _prune_configs(_autotune_configs(), {"Q": q, "N_Q": n_q, "N_K": n_k}, HEAD_DIM=head_dim)


def test_pruning_respects_shared_memory_at_head_dim_256():
    limit = _max_shared_memory(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        kept = _pruned(dtype, 256)
        assert kept
        for cfg in kept:
            smem = estimated_shared_memory(cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_stages, 256,
                                           torch.empty(0, dtype=dtype).element_size())
            assert smem <= limit
    assert len(_pruned(torch.float32, 256)) <= 3  # fp32 (IEEE dots) keeps small tiles only


def test_pruning_drops_tiles_larger_than_the_problem():
    kept = _pruned(torch.float16, 32, n_q=20, n_k=40)
    assert kept and all(cfg.kwargs["BLOCK_M"] <= 32 and cfg.kwargs["BLOCK_N"] <= 64 for cfg in kept)
