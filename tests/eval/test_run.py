"""The eval loop on torch and onnxruntime (tiny config, random weights, a few episodes): the cross-backend
report, resume after SIGKILL, bad-dataset errors, episodes-only / replay through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fssam_deploy.errors import InputError
from fssam_deploy.eval.datasets import open_lists
from fssam_deploy.eval.episodes import EpisodeSpec, sample_episodes
from fssam_deploy.eval.inputs import check_files, load_episode
from fssam_deploy.eval.report import build_report, write_report
from fssam_deploy.eval.run import read_records, run_eval, save_overlays

from .conftest import DATA, eval_main

EPISODES = 3
TINY_FLAGS = ["--sam2-config", "sam2_hiera_t", "--dino", "dinov2_vits14", "--image-size", "256"]


@pytest.fixture(scope="session")
def backends(tiny_cfg, tiny_graphs):
    from fssam_deploy.backends.registry import open_backend

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps = {"torch": open_backend("torch", tiny_cfg, seed=0),
               "onnxruntime": open_backend("onnxruntime", tiny_cfg, engine_dir=tiny_graphs)}
    yield eps
    for ep in eps.values():
        ep.close()


@pytest.fixture(scope="session")
def cross_run(voc_root, backends, tiny_cfg, tmp_path_factory):
    eps = sample_episodes(open_lists("pascal", voc_root, 0), 1, EPISODES)
    out = tmp_path_factory.mktemp("cross")
    run = run_eval(eps, backends, voc_root, out, tiny_cfg.image_size, {"test": 1}, progress=False)
    return run, out


def test_cross_backend_report(cross_run, backends, voc_root, tiny_cfg):
    run, out = cross_run
    assert [r["index"] for r in run.records] == list(range(EPISODES))
    report = build_report(run, {"dataset": "pascal", "fold": 0, "shots": 1, "random_weights": True},
                          [1, 2, 3, 4, 5], {"torch": {"precision": "fp32"}, "onnxruntime": {"precision": "fp32"}})
    torch_row, ort_row = report["backends"]
    assert torch_row["delta_miou"] == 0 and torch_row["agreement"]["min"] == 1.0
    assert ort_row["agreement"]["vs"] == "torch" and ort_row["agreement"]["min"] >= 0.99  # fp32 graphs
    assert abs(ort_row["delta_miou"]) < 0.01 and abs(ort_row["delta_fb_iou"]) < 0.01
    assert len(ort_row["agreement"]["worst"]) == EPISODES
    assert 0 <= torch_row["scores"]["miou"] <= 1 and torch_row["scores"]["episodes"] == EPISODES
    js, md = write_report(report, out)
    assert json.loads(js.read_text())["backends"][1]["backend"] == "onnxruntime"
    text = md.read_text()
    assert "| onnxruntime | fp32 |" in text and "random weights" in text and "| 1 |" in text
    paths = save_overlays(run, backends, voc_root, out, tiny_cfg.image_size, n=1)
    assert len(paths) == 1 and Image.open(paths[0]).size[0] == 4 * Image.open(voc_root / run.records[
        int(paths[0].stem.split("_ep")[1][:4])]["query"]).size[0]


def test_resume_after_sigkill(cross_run, voc_root, tmp_path):
    """A CLI eval killed after its first episode, resumed, scores exactly as the uninterrupted run."""
    out = tmp_path / "killed"
    argv = ["--dataset", "pascal", "--data-root", str(voc_root), "--fold", "0", "--backend", "torch",
            "--episodes", str(EPISODES), "--out", str(out), "--no-progress", *TINY_FLAGS]
    code = ("import sys; from tests.eval.conftest import eval_main; sys.exit(eval_main(sys.argv[1:]))")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            res = out / "results.jsonl"
            if res.is_file() and res.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the eval ended before it was killed: {proc.stderr.read().decode()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    lines = (out / "results.jsonl").read_bytes().count(b"\n")
    assert 1 <= lines < EPISODES
    with (out / "results.jsonl").open("a") as f:
        f.write(f'{{"index": {lines}, "class": 1, "backe')  # a line torn by the kill
    assert eval_main(argv) == 1  # without --resume the partial results are not overwritten
    assert eval_main([*argv, "--resume"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from"] == lines and report["episodes"] == EPISODES
    got = [(r["index"], r["backends"]["torch"]["intersection"], r["backends"]["torch"]["union"])
           for r in read_records(out / "results.jsonl", ["torch"])]
    run, _ = cross_run
    want = [(r["index"], r["backends"]["torch"]["intersection"], r["backends"]["torch"]["union"]) for r in run.records]
    assert got == want
    uninterrupted = build_report(run, {}, [1, 2, 3, 4, 5])["backends"][0]["scores"]
    assert report["backends"][0]["scores"] == json.loads(json.dumps(uninterrupted))
    assert eval_main([*argv, "--resume", "--seed", "322"]) == 1  # another run's folder: refused


def test_resume_refuses_another_run(voc_root, backends, tiny_cfg, tmp_path):
    eps = sample_episodes(open_lists("pascal", voc_root, 0), 1, 1)
    run_eval(eps, {"torch": backends["torch"]}, voc_root, tmp_path, tiny_cfg.image_size, {"x": 1}, progress=False)
    with pytest.raises(Exception, match=r"--resume: .*run.json was written by another run \(differs in x\)"):
        run_eval(eps, {"torch": backends["torch"]}, voc_root, tmp_path, tiny_cfg.image_size, {"x": 2}, resume=True,
                 progress=False)


@pytest.fixture
def broken_root(voc_root, tmp_path):
    root = tmp_path / "VOC2012"
    shutil.copytree(voc_root, root)
    return root


def test_missing_image_is_an_error_naming_it(broken_root, capsys):
    eps = sample_episodes(open_lists("pascal", broken_root, 0), 1, 5)
    victim = broken_root / eps[2].supports[0][0]
    victim.unlink()
    with pytest.raises(InputError, match=rf"{victim}: support image of episode \d+ not found"):
        check_files(broken_root, eps)
    with pytest.raises(InputError, match=rf"{victim}: support image not found"):
        load_episode(broken_root, eps[2], 64)
    argv = ["--dataset", "pascal", "--data-root", str(broken_root), "--fold", "0", "--episodes", "5",
            "--episodes-only", "--out", str(broken_root.parent / "o")]
    assert eval_main(argv) == 1
    assert f"error: {victim}: support image" in capsys.readouterr().err


def test_wrong_size_label_is_an_error_naming_it(broken_root):
    eps = sample_episodes(open_lists("pascal", broken_root, 0), 1, 2)
    label = broken_root / eps[1].query[1]
    arr = np.asarray(Image.open(label))
    Image.fromarray(arr[:-3]).save(label)
    with pytest.raises(InputError, match=rf"{label}: query label is \d+x\d+ \(WxH\) but its image .* is"):
        check_files(broken_root, eps)
    with pytest.raises(InputError, match=rf"{label}: query label is"):
        load_episode(broken_root, eps[1], 64)


def test_inputs_match_the_reference_loader(voc_root):
    """Tensors the reference's loader gave (val_size 64) for the first episodes: labels exact, images as decoded
    and resized here (0 difference when recorded; JPEG re-encoding by another Pillow may shift a few levels)."""
    z = np.load(DATA / "reference_tensors.npz")
    ref = json.loads((DATA / "reference_metrics.json").read_text())["episodes"]
    from fssam_deploy.eval.datasets import relative

    for j in range(2):
        q, c, s = ref[j]
        spec = EpisodeSpec(j, (relative(q[0], "pascal"), relative(q[1], "pascal")), c,
                           tuple((relative(a, "pascal"), relative(b, "pascal")) for a, b in s))
        inp = load_episode(voc_root, spec, 64)
        assert (inp.target == z[f"raw_label{j}"]).all()
        assert ((inp.masks[0].numpy() == 1) == (z[f"s_y{j}"] == 1)).all()
        assert np.abs(inp.query[0].numpy() - z[f"x{j}"]).mean() < 2.0
        assert np.abs(inp.supports[0].numpy() - z[f"s_x{j}"]).mean() < 2.0


def test_episodes_only_and_replay(voc_root, tmp_path):
    out = tmp_path / "a"
    base = ["--dataset", "pascal", "--data-root", str(voc_root), "--fold", "0"]
    assert eval_main([*base, "--episodes", "6", "--shots", "5", "--workers", "3", "--episodes-only",
                      "--out", str(out)]) == 0
    doc = json.loads((out / "episodes.json").read_text())
    assert doc["count"] == 6 and doc["shots"] == 5 and len(doc["episodes"][0]["supports"]) == 5
    again = tmp_path / "b"
    assert eval_main(["--data-root", str(voc_root), "--episodes-file", str(out / "episodes.json"), "--shots", "5",
                      "--episodes", "4", "--episodes-only", "--out", str(again)]) == 0
    assert json.loads((again / "episodes.json").read_text())["episodes"] == doc["episodes"][:4]
    assert eval_main(["--data-root", str(voc_root), "--episodes-file", str(out / "episodes.json"),
                      "--episodes-only", "--out", str(again)]) == 1  # --shots 1 against a 5-shot list
