"""Shared fixtures: golden vectors, tiny configs and pipelines built once per session."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The variable must be
# set before anything imports triton, hence here, in the first conftest pytest loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

GOLDEN = Path(__file__).parent / "data" / "golden"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """The script benchmarks/<name>.py as a module (scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_golden(name: str) -> tuple[dict, dict, dict]:
    """-> (arrays as tensors, state_dict, meta) of tests/data/golden/<name>.npz."""
    z = np.load(GOLDEN / f"{name}.npz", allow_pickle=False)
    arrays, sd = {}, {}
    for k in z.files:
        if k.startswith("state_dict."):
            sd[k[len("state_dict.") :]] = torch.from_numpy(z[k])
        elif k != "meta":
            a = z[k]
            arrays[k] = torch.from_numpy(a) if a.dtype.kind in "fiub" else a
    return arrays, sd, json.loads(str(z["meta"]))


def make_episode(cfg, batch: int = 1, shots: int | None = None, seed: int = 0):
    """Smooth random images (0..255) and rectangular support masks."""
    g = torch.Generator().manual_seed(seed)
    s, k = cfg.image_size, shots or cfg.shots

    def smooth(n):
        low = torch.rand(n, 3, 8, 8, generator=g) * 255
        return torch.nn.functional.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)

    query = smooth(batch)
    supports = smooth(batch * k).reshape(batch, k, 3, s, s)
    masks = torch.zeros(batch, k, s, s)
    for b in range(batch):
        for i in range(k):
            y0, x0 = torch.randint(0, s // 2, (2,), generator=g).tolist()
            h, w = torch.randint(s // 8, s // 2, (2,), generator=g).tolist()
            masks[b, i, y0 : y0 + h, x0 : x0 + w] = 1
    return query, supports, masks


@pytest.fixture(scope="session")
def tiny_cfg():
    from fssam_deploy.model import FSSAMConfig

    return FSSAMConfig.from_name("tiny")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_cfg):
    from fssam_deploy.model import Pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Pipeline.from_config(tiny_cfg, seed=0, attention_backend="torch")


@pytest.fixture(scope="session")
def graphs(tmp_path_factory, tiny_cfg):
    """Every stage of the tiny config (fp32, dynamic batch) and the decoder's plugin variant, weights of seed 0.

    Read-only for the tests that take it (the TensorRT ones); tests that need other graphs define their own."""
    from fssam_deploy.export.onnx_export import export_onnx
    from fssam_deploy.export.onnx_plugin_variant import export_plugin_variants

    out = export_onnx(tiny_cfg, tmp_path_factory.mktemp("trt") / "graphs", seed=0, batch="dynamic", progress=False)
    export_plugin_variants(tiny_cfg, out, seed=0)
    return out
