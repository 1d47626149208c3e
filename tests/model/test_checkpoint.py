"""Checkpoint formats round-trip; wrong architectures and corrupt files give clear errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from fssam_deploy.errors import CheckpointError
from fssam_deploy.model import (
    FSSAMConfig,
    Pipeline,
    random_weights,
    save_dino_checkpoint,
    save_fssam_checkpoint,
    save_sam2_checkpoint,
)
from tests.helpers import make_episode


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_cfg):
    d = tmp_path_factory.mktemp("ckpt")
    w = random_weights(tiny_cfg, seed=5)
    save_fssam_checkpoint(w, d / "fssam.pth")
    save_fssam_checkpoint(w, d / "fssam_module.pth", module_prefix=True)
    save_sam2_checkpoint(w, d / "sam2.pt")
    save_dino_checkpoint(w, d / "dino.pth")
    return d, w


def load(cfg, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Pipeline.from_config(cfg, attention_backend="torch", **kw)


def test_formats_roundtrip(saved, tiny_cfg):
    d, w = saved
    q, sx, sy = make_episode(tiny_cfg, seed=1)
    ref = Pipeline(w, attention_backend="torch").segment(q, sx, sy)
    for kw in (dict(checkpoint=d / "fssam.pth"), dict(checkpoint=d / "fssam_module.pth"),
               dict(sam2_checkpoint=d / "sam2.pt", dino_checkpoint=d / "dino.pth")):
        p = load(tiny_cfg, **kw)
        assert not p.random_weights
        torch.testing.assert_close(p.segment(q, sx, sy), ref, atol=0, rtol=0)


def test_loaded_weights_equal_saved(saved, tiny_cfg):
    d, w = saved
    p = load(tiny_cfg, checkpoint=d / "fssam.pth")
    for (k, a), (_, b) in zip(w.state_dict().items(), p.weights.state_dict().items()):
        assert torch.equal(a, b), k
    # DINOv2's resampled 560 px position grid is recomputed after loading
    fresh = load(tiny_cfg, seed=99)
    assert not torch.equal(fresh.stages.dino_features.pos_embed, p.stages.dino_features.pos_embed)
    from fssam_deploy.model.dinov2 import dinov2_pos_embed
    torch.testing.assert_close(p.stages.dino_features.pos_embed, dinov2_pos_embed(w.dino.pos_embed, 40))


def test_wrong_architecture(saved, tiny_cfg):
    d, _ = saved
    with pytest.raises(CheckpointError, match=r"fssam.pth: SAM 2 \(sam2\.\*\) weights do not fit.*(missing|shape)"):
        load(tiny_cfg.replace(sam2_config="sam2_hiera_s"), checkpoint=d / "fssam.pth")
    with pytest.raises(CheckpointError, match=r"DINOv2 \(dino\.\*\) weights do not fit.*shape mismatches"):
        load(tiny_cfg.replace(dino="dinov2_vitb14"), checkpoint=d / "fssam.pth")


def test_missing_and_unexpected_keys(saved, tiny_cfg, tmp_path):
    d, _ = saved
    obj = torch.load(d / "fssam.pth", weights_only=True)
    sd = obj["state_dict"]
    sd.pop("sam2.no_obj_ptr")
    sd["sam2.extra.weight"] = torch.zeros(1)
    torch.save(obj, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"broken.pth: .*missing keys: no_obj_ptr.*unexpected keys: extra.weight"):
        load(tiny_cfg, checkpoint=tmp_path / "broken.pth")
    torch.save({"state_dict": {"head.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other.pth: not an FSSAM checkpoint: keys outside"):
        load(tiny_cfg, checkpoint=tmp_path / "other.pth")


def test_corrupt_and_missing_files(tmp_path, tiny_cfg, saved):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth: cannot read checkpoint"):
        load(tiny_cfg, checkpoint=tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="nope.pth: checkpoint file not found"):
        load(tiny_cfg, checkpoint=tmp_path / "nope.pth")
    d, _ = saved
    with pytest.raises(CheckpointError, match="both a SAM 2 and a DINOv2 checkpoint"):
        load(tiny_cfg, sam2_checkpoint=d / "sam2.pt")
    with pytest.raises(CheckpointError, match="not a SAM 2 checkpoint"):
        load(tiny_cfg, sam2_checkpoint=d / "dino.pth", dino_checkpoint=d / "dino.pth")


def test_random_weights_warn_loudly(tiny_cfg):
    with pytest.warns(UserWarning, match="RANDOM weights"):
        p = Pipeline.from_config(tiny_cfg, seed=1)
    assert p.random_weights


def test_seed_determines_weights(tiny_cfg):
    a, b, c = random_weights(tiny_cfg, 3), random_weights(tiny_cfg, 3), random_weights(tiny_cfg, 4)
    assert torch.equal(a.sam2.no_obj_ptr, b.sam2.no_obj_ptr)
    assert not torch.equal(a.sam2.no_obj_ptr, c.sam2.no_obj_ptr)
    assert FSSAMConfig.from_name("tiny") == a.cfg
