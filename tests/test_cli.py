"""The `fssam` command end to end: demo, run (files, folders, formats), bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fssam_deploy.cli import main
from fssam_deploy.model import random_weights, save_fssam_checkpoint
from fssam_deploy.model.checkpoint import file_sha256
from fssam_deploy.synthetic import synthetic_episode

TINY = ["--sam2-config", "sam2_hiera_t", "--dino", "dinov2_vits14", "--image-size", "256"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A query (JPEG, 300x200), a second query (RGBA PNG), 2 supports of other sizes, masks, checkpoint."""
    d = tmp_path_factory.mktemp("cli")
    q, _, sups, masks = synthetic_episode(256, shots=2, seed=1)
    Image.fromarray(q).resize((300, 200)).save(d / "query.jpg")
    (d / "queries").mkdir()
    Image.fromarray(q).resize((300, 200)).save(d / "queries" / "a.jpg")
    Image.fromarray(np.dstack([q, np.full(q.shape[:2], 255, np.uint8)])).save(d / "queries" / "b.png")
    for i, (s, m) in enumerate(zip(sups, masks)):
        size = (240 + 40 * i, 180)
        Image.fromarray(s).resize(size).convert("L").save(d / f"s{i}.png")  # a gray support
        Image.fromarray((m * 255).astype(np.uint8)).resize(size, Image.NEAREST).save(d / f"m{i}.png")
    from fssam_deploy.model import FSSAMConfig

    save_fssam_checkpoint(random_weights(FSSAMConfig.from_name("tiny"), 2), d / "ckpt.pth")
    return d


def test_demo_with_no_arguments(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "logits (1, 1, 256, 256)" in out
    for f in ("mask.png", "overlay.png", "query.png", "support_0.png", "logits.npy", "onnx/manifest.json",
              "bench/bench.json", "bench/bench.md", "bench/bench.png"):
        assert (tmp_path / "fssam-demo" / f).is_file(), f
    rows = json.loads((tmp_path / "fssam-demo" / "bench" / "bench.json").read_text())["rows"]
    assert {r["backend"] for r in rows} == {"torch", "onnxruntime"}
    assert all(r["mask_iou"] >= 0.999 and r["max_abs_logit_err"] < 1e-3 for r in rows), rows
    assert "| onnxruntime | 1 | 1 |" in out


def test_run_one_query(files, tmp_path, capsys):
    d = files
    rc = main(["run", *TINY, "--checkpoint", str(d / "ckpt.pth"), "--query", str(d / "query.jpg"),
               "--support", str(d / "s0.png"), "--support-mask", str(d / "m0.png"),
               "--out", str(tmp_path / "mask.png"), "--logits", str(tmp_path / "l.npy"),
               "--overlay", str(tmp_path / "ov.png")])
    assert rc == 0
    mask = np.asarray(Image.open(tmp_path / "mask.png"))
    logits = np.load(tmp_path / "l.npy")
    assert mask.shape == (200, 300) and logits.shape == (200, 300) and logits.dtype == np.float32
    assert set(np.unique(mask)) <= {0, 255}
    # the mask is torch's sigmoid >= 0.5 (the reference's rule); numpy's exp rounds differently within ~1e-7 of 0
    np.testing.assert_array_equal(mask > 0, (torch.sigmoid(torch.from_numpy(logits)) >= 0.5).numpy())
    assert Image.open(tmp_path / "ov.png").size == (300, 200)
    assert "1 query(ies) against 1 support(s)" in capsys.readouterr().out


def test_run_folder_of_queries_two_shots(files, tmp_path):
    d = files
    rc = main(["run", *TINY, "--checkpoint", str(d / "ckpt.pth"), "--query", str(d / "queries"),
               "--support", str(d / "s0.png"), "--support-mask", str(d / "m0.png"),
               "--support", str(d / "s1.png"), "--support-mask", str(d / "m1.png"),
               "--out", str(tmp_path / "masks"), "--batch", "2"])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["a.png", "b.png"]


@pytest.mark.parametrize("case, match", [
    ("count", r"1 support image\(s\) but 2 support mask\(s\)"),
    ("size", "m1.png: mask is 280x180 .* but its support .*s0.png is 240x180"),
    ("unreadable", "query.txt: cannot read image"),
    ("missing", "nope.jpg: image file not found"),
    ("config", "unknown SAM 2 config 'sam2_hiera_xl'"),
    ("channels", "a mask must have one channel"),
])
def test_run_bad_input(files, tmp_path, capsys, case, match):
    d = files
    (tmp_path / "query.txt").write_text("hello")
    rgb = np.zeros((180, 240, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "rgbmask.png")
    q, s, m = str(d / "query.jpg"), str(d / "s0.png"), str(d / "m0.png")
    args = {"count": ["--support", s, "--support-mask", m, "--support-mask", m],
            "size": ["--support", s, "--support-mask", str(d / "m1.png")],
            "channels": ["--support", s, "--support-mask", str(tmp_path / "rgbmask.png")]}.get(
        case, ["--support", s, "--support-mask", m])
    query = {"unreadable": str(tmp_path / "query.txt"), "missing": str(tmp_path / "nope.jpg")}.get(case, q)
    model = ["--sam2-config", "sam2_hiera_xl"] if case == "config" else TINY
    rc = main(["run", *model, "--query", query, *args, "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc == 1
    import re

    assert re.search(match, err), err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err


def test_run_wrong_architecture_checkpoint(files, tmp_path, capsys):
    d = files
    rc = main(["run", "--sam2-config", "sam2_hiera_s", "--dino", "dinov2_vits14", "--image-size", "256",
               "--checkpoint", str(d / "ckpt.pth"), "--query", str(d / "query.jpg"), "--support", str(d / "s0.png"),
               "--support-mask", str(d / "m0.png"), "--out", str(tmp_path / "o.png")])
    assert rc == 1
    assert "weights do not fit this architecture" in capsys.readouterr().err


def _run_one(files, tmp_path, tag, *extra, checkpoint=None):
    d = files
    rc = main(["run", *TINY, "--checkpoint", str(checkpoint or d / "ckpt.pth"), "--query", str(d / "query.jpg"),
               "--support", str(d / "s0.png"), "--support-mask", str(d / "m0.png"),
               "--out", str(tmp_path / f"{tag}.png"), "--logits", str(tmp_path / f"{tag}.npy"), *extra])
    assert rc == 0
    return np.load(tmp_path / f"{tag}.npy"), np.asarray(Image.open(tmp_path / f"{tag}.png"))


@pytest.mark.slow
def test_build_aoti_then_run_matches_torch(files, tiny_aoti, tmp_path, capsys):
    """`fssam build --format aoti --checkpoint` (every stage, CPU, tiny config: the session's `tiny_aoti`, built
    through the CLI) then `fssam run --backend aoti` == `fssam run` with torch on the same checkpoint."""
    checkpoint = tiny_aoti.parent / "ckpt.pth"
    manifest = json.loads((tiny_aoti / "manifest.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["weights"] == f"sha256:{file_sha256(checkpoint)}"
    assert all((tiny_aoti / e["file"]).is_file() for e in manifest["stages"].values())
    ref_logits, ref_mask = _run_one(files, tmp_path, "torch", checkpoint=checkpoint)
    logits, mask = _run_one(files, tmp_path, "aoti", "--backend", "aoti", "--engine-dir", str(tiny_aoti),
                            checkpoint=checkpoint)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert (mask == ref_mask).mean() > 0.999
    # a package set built for another config is refused with the command to rebuild
    capsys.readouterr()
    rc = main(["run", "--sam2-config", "sam2_hiera_s", "--dino", "dinov2_vits14", "--image-size", "256",
               "--backend", "aoti", "--engine-dir", str(tiny_aoti), "--query", str(files / "query.jpg"),
               "--support", str(files / "s0.png"), "--support-mask", str(files / "m0.png"),
               "--out", str(tmp_path / "x.png")])
    assert rc == 1 and "rebuild" in capsys.readouterr().err.lower()


def test_engine_backends_need_an_engine_dir(files, tmp_path, capsys):
    for backend, source in (("onnxruntime", "fssam export"), ("aoti", "fssam build --format aoti"),
                            ("tensorrt", "fssam build --format tensorrt")):
        rc = main(["run", *TINY, "--backend", backend, "--query", str(files / "query.jpg"), "--support",
                   str(files / "s0.png"), "--support-mask", str(files / "m0.png"), "--out", str(tmp_path / "m.png")])
        assert rc == 1 and f"`{source}`" in capsys.readouterr().err
