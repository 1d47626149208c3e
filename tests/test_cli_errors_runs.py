"""Issue 16, the reproducers that need real work: images read as people see them (one `fssam run` subprocess
over a folder holding every case, so stderr and warnings are the user's), an ONNX Runtime run with random
weights, and an export killed with SIGKILL then redone with --force over a user's folder."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fssam_deploy.synthetic import synthetic_episode
from tests.cli_probe import TINY, episode_args, snapshot, user_folder, write_episode

CLI = [sys.executable, "-m", "fssam_deploy.cli"]
EXIF_ORIENTATION = 0x0112  # 6: turn 90 degrees clockwise to display


def save_exif_rotated(displayed: Image.Image, path: Path) -> None:
    """Store `displayed` turned a quarter counter-clockwise with EXIF orientation 6, as a phone does."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    displayed.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif.tobytes(), quality=95)


def write_image_cases(d: Path) -> dict:
    """queries/: x.jpg and x.png (same stem), g16.png (16-bit gray) and g8.png (its 8-bit version), clip.png (what a
    clipped read of g16 would see), r.jpg (EXIF-rotated, displayed 64x96). Supports: s_exif.jpg (EXIF-rotated,
    displayed 90x120) with a mask drawn on the displayed image, s2.png with a soft (anti-aliased) mask."""
    q, _, sups, masks = synthetic_episode(128, shots=2, seed=7)
    qd = d / "queries"
    qd.mkdir(parents=True)
    Image.fromarray(q).resize((96, 64)).save(qd / "x.jpg", quality=95)
    Image.fromarray(np.ascontiguousarray(q[::-1, ::-1])).resize((96, 64)).save(qd / "x.png")
    gray8 = np.asarray(Image.fromarray(q).convert("L").resize((80, 60)))
    Image.fromarray(gray8).save(qd / "g8.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(qd / "g16.png")
    Image.fromarray(np.where(gray8 > 0, 255, 0).astype(np.uint8)).save(qd / "clip.png")
    save_exif_rotated(Image.fromarray(q).resize((64, 96)), qd / "r.jpg")
    save_exif_rotated(Image.fromarray(sups[0]).resize((90, 120)), d / "s_exif.jpg")
    Image.fromarray((masks[0] * 255).astype(np.uint8)).resize((90, 120), Image.NEAREST).save(d / "m_exif.png")
    Image.fromarray(sups[1]).resize((100, 80)).save(d / "s2.png")
    soft = Image.fromarray((masks[1] * 255).astype(np.uint8)).resize((100, 80), Image.BILINEAR)
    soft.save(d / "m_soft.png")
    assert len(np.unique(np.asarray(soft))) > 3  # really anti-aliased
    assert Image.open(qd / "g16.png").mode.startswith("I")  # really 16-bit
    assert Image.open(qd / "r.jpg").size == (96, 64)  # stored landscape, displayed portrait
    return {"queries": qd}


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """`fssam run` (torch, random weights, 2 shots, every query in one batch) as a subprocess."""
    d = tmp_path_factory.mktemp("images")
    write_image_cases(d)
    inputs = snapshot(d)
    cmd = [*CLI, "run", *TINY, "--query", "queries", "--support", "s_exif.jpg", "--support-mask", "m_exif.png",
           "--support", "s2.png", "--support-mask", "m_soft.png", "--out", "masks/", "--logits", "logits/",
           "--batch", "8"]
    proc = subprocess.run(cmd, cwd=d, capture_output=True, text=True, timeout=1200)
    return {"dir": d, "proc": proc, "inputs": inputs, "inputs_after": {k: v for k, v in snapshot(d).items()
                                                                       if k.startswith(("queries", "s", "m_"))}}


def ok(run) -> subprocess.CompletedProcess:
    proc = run["proc"]
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_exif_support_with_mask_drawn_on_displayed_image_accepted(image_run):
    ok(image_run)
    assert image_run["inputs_after"] == image_run["inputs"]  # inputs untouched


def test_exif_query_segmented_as_displayed(image_run):
    ok(image_run)
    assert Image.open(image_run["dir"] / "masks" / "r.png").size == (64, 96)
    assert np.load(image_run["dir"] / "logits" / "r.npy").shape == (96, 64)


def test_16bit_query_scaled_not_clipped(image_run):
    ok(image_run)
    lg = {n: np.load(image_run["dir"] / "logits" / f"{n}.npy") for n in ("g16", "g8", "clip")}
    np.testing.assert_allclose(lg["g16"], lg["g8"], atol=1e-4, rtol=0)
    assert np.abs(lg["g16"] - lg["clip"]).max() > 1e-2  # the check can fail: a clipped read differs


def test_same_stem_queries_write_two_masks(image_run):
    ok(image_run)
    d = image_run["dir"]
    assert sorted(p.name for p in (d / "masks").iterdir()) == sorted(
        f"{n}.png" for n in ("x_jpg", "x_png", "g16", "g8", "clip", "r"))
    assert not np.array_equal(np.load(d / "logits" / "x_jpg.npy"), np.load(d / "logits" / "x_png.npy"))


def test_soft_mask_thresholded_with_warning(image_run):
    err = ok(image_run).stderr
    assert "m_soft.png: soft mask" in err and "thresholded at >= 128 (half of 255)" in err, err
    assert "m_exif.png" not in err  # the binary mask is not warned about


def test_torch_run_random_weights_warned(image_run):
    assert "WARNING: no checkpoint given: RANDOM weights (seed 0)" in ok(image_run).stderr


@pytest.fixture(scope="module")
def onnx_run(tiny_graphs, tmp_path_factory):
    """`fssam run --backend onnxruntime` over the session's graphs (random weights, seed 0); --out an existing
    folder (one query), --logits in folders that do not exist yet."""
    from fssam_deploy.cli import main

    d = tmp_path_factory.mktemp("onnx_run")
    ep = write_episode(d / "in")
    (d / "existing").mkdir()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["run", *TINY, *episode_args(ep), "--backend", "onnxruntime", "--engine-dir", str(tiny_graphs),
                   "--out", str(d / "existing"), "--logits", str(d / "new" / "sub" / "l.npy")])
    return {"dir": d, "rc": rc, "out": out.getvalue(), "err": err.getvalue()}


def test_onnxruntime_random_weights_warned(onnx_run):
    assert onnx_run["rc"] == 0, onnx_run
    assert "WARNING: no checkpoint given: RANDOM weights (seed 0)" in onnx_run["err"], onnx_run["err"]


def test_out_existing_folder_gets_the_query_named_mask(onnx_run):
    assert onnx_run["rc"] == 0, onnx_run
    assert [p.name for p in (onnx_run["dir"] / "existing").iterdir()] == ["q.png"]
    assert Image.open(onnx_run["dir"] / "existing" / "q.png").size == (64, 48)


def test_logits_into_a_folder_that_does_not_exist(onnx_run):
    assert onnx_run["rc"] == 0, onnx_run
    assert np.load(onnx_run["dir"] / "new" / "sub" / "l.npy").shape == (48, 64)


def _wait_for(find, proc, log: Path, timeout_s: float):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        found = find()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"export ended (exit {proc.returncode}) before its temp folder appeared:\n{log.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"no temp folder after {timeout_s} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def killed_export(tmp_path_factory):
    """`fssam export --force --out d` over a user's folder d, killed with SIGKILL once its temp folder appears; then
    the same export again (in-process) into the same d."""
    from fssam_deploy.cli import main

    root = tmp_path_factory.mktemp("killed")
    d = user_folder(root / "d")
    user = snapshot(d)
    log = root.parent / f"{root.name}.log"
    argv = ["export", *TINY, "--no-progress", "--force", "--out", "d"]
    with open(log, "w") as f:
        proc = subprocess.Popen([*CLI, *argv], cwd=root, stdout=f, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: [p for p in root.iterdir() if p.name.startswith(".d.fssam-tmp-")], proc, log, 1200)
        time.sleep(0.5)  # well inside the export: it takes a minute or more
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = sorted(p.name for p in root.iterdir() if p.name != "d")
    after_kill = snapshot(d)
    cwd = os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.chdir(root)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = main(argv)
    finally:
        os.chdir(cwd)
    return {"root": root, "d": d, "user": user, "killed_rc": proc.returncode, "left": left,
            "after_kill": after_kill, "rc": rc, "err": err.getvalue(), "after": sorted(p.name for p in root.iterdir())}


def test_sigkill_mid_export_leaves_nothing_the_next_export_does_not_clean(killed_export):
    k = killed_export
    assert k["killed_rc"] == -signal.SIGKILL
    assert len(k["left"]) == 1 and k["left"][0].startswith(".d.fssam-tmp-"), k["left"]  # the kill left its temp
    assert k["after_kill"] == k["user"]  # the killed export touched nothing of the user's
    assert k["rc"] == 0, k["err"]
    assert k["after"] == ["d"], k["after"]  # no .d.fssam-tmp-* / -old-* remains


def test_export_force_replaces_a_user_folder(killed_export):
    k = killed_export
    assert k["rc"] == 0, k["err"]
    manifest = json.loads((k["d"] / "manifest.json").read_text())
    assert manifest["format"] == "fssam-onnx/1"
    files = {p.name for p in k["d"].iterdir()}
    assert "thesis.tex" not in files and "notes" not in files
    assert files == {"manifest.json", *(e["file"] for e in manifest["stages"].values())}
