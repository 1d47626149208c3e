"""OpenVINO IR of the tiny config, built once per session from the shared `tiny_graphs` (fp32 and int8), and the
PyTorch fp32 logits every parity test compares with."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("openvino", reason="the openvino backends need: pip install 'fssam-deploy[openvino]'")

EPISODE_BATCH = 2  # two synthetic episodes (seeds 0 and 1), one shot


@pytest.fixture(scope="session")
def ov_fp32(tiny_graphs, tmp_path_factory):
    """fp32 IR (dynamic batch) of the tiny graphs. Read-only: tests that change a folder copy it (`linked_copy`)."""
    from fssam_deploy.backends.openvino.build import build_openvino

    return build_openvino(tiny_graphs, tmp_path_factory.mktemp("ov") / "fp32")


@pytest.fixture(scope="session")
def ov_int8(tiny_graphs, tmp_path_factory):
    """int8 IR: image encoder and DINOv2 quantized by NNCF on 2 synthetic episodes."""
    pytest.importorskip("nncf")
    from fssam_deploy.backends.openvino.build import build_openvino

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_openvino(tiny_graphs, tmp_path_factory.mktemp("ov") / "int8", precision="int8",
                              calibration_episodes=2, threads=2)


@pytest.fixture(scope="session")
def tiny_episode(tiny_cfg):
    """(query, supports, masks) of two synthetic 1-shot episodes."""
    from fssam_deploy.synthetic import episode_tensors

    return episode_tensors(tiny_cfg, EPISODE_BATCH, 1, 0)


@pytest.fixture(scope="session")
def torch_logits(tiny_cfg, tiny_episode):
    """PyTorch fp32 eager logits of `tiny_episode`, weights of seed 0 (the graphs' weights)."""
    from fssam_deploy.backends.registry import open_backend

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open_backend("torch", tiny_cfg, seed=0) as ref:
            return ref.segment(*tiny_episode)
