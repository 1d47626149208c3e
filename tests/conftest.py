"""Shared fixtures, built once per session: the tiny config, its pipeline, its exported graphs, its AOTInductor
packages."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The variable must be
# set before anything imports triton, hence here, in the first conftest pytest loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers import build_tiny_aoti, export_tiny_graphs  # noqa: E402


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
def tiny_graphs(tmp_path_factory):
    """Every stage of the tiny config as ONNX (fp32, dynamic batch, weights of seed 0), exported once per session
    through the CLI (`fssam export`), plus the decoder's TensorRT plugin variant. Read-only: a test that changes a
    folder copies it first (`copy_graphs`)."""
    return export_tiny_graphs(tmp_path_factory.mktemp("tiny") / "graphs")


@pytest.fixture(scope="session")
def tiny_aoti(tmp_path_factory):
    """Every stage of the tiny config as AOTInductor CPU packages, built once per session through the CLI
    (`fssam build --format aoti --checkpoint ckpt.pth`, a checkpoint of seed-0 random weights, which lies next to
    the folder): the C++ compile takes minutes on 2 cores. Read-only: a test that changes it copies it first."""
    return build_tiny_aoti(tmp_path_factory.mktemp("tiny-aoti"))
