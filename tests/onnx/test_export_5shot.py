"""5-shot end to end on ONNX Runtime (tiny config): every stage exported with shots=5, one episode against
Pipeline.segment. Exported once for the module."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from fssam_deploy.backends.onnxruntime import onnx_episode
from fssam_deploy.model import FSSAMConfig, Pipeline, random_weights
from fssam_deploy.onnx.export import export_onnx
from fssam_deploy.stages import STAGE_SPECS
from tests.helpers import make_episode

SHOTS = 5


@pytest.fixture(scope="module")
def cfg5():
    return FSSAMConfig.from_name("tiny", shots=SHOTS)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory, cfg5):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_onnx(cfg5, tmp_path_factory.mktemp("onnx5") / "graphs", seed=2, progress=False)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def test_5shot_episode_matches_pipeline(engine_dir, cfg5):
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert manifest["shots"] == SHOTS and set(manifest["stages"]) == set(STAGE_SPECS)
    episode = onnx_episode(engine_dir, expect=cfg5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = Pipeline(random_weights(cfg5, 2), attention_backend="torch")
    q, sx, sy = make_episode(cfg5, batch=1, shots=SHOTS, seed=7)
    # distinct masks: shots are not interchangeable (FSSAM5s: support 0 gives the calibration prototype),
    # so a graph that mixed up their order would not match the Pipeline
    assert len({m.sum().item() for m in sy[0]}) == SHOTS
    got, ref = episode.segment(q, sx, sy), pipe.segment(q, sx, sy)
    assert got.shape == ref.shape == (1, 1, cfg5.image_size, cfg5.image_size)
    err = (got - ref).abs().max().item()
    assert err <= 1e-3, f"max logit error {err:.2e} (scale {ref.abs().max().item():.3g})"
    assert iou(got > 0, ref > 0) >= 0.999
