"""Issue 16, one test per reproducer: nothing lost, nothing half-written, one clear line for every bad input.

Refusals run in-process under `forbid_expensive_work` (building the model or opening a graph fails the test),
so each one proves it comes before the expensive work. Real runs are shared per module: one `fssam run`
subprocess (real stderr and warnings) over a query folder that holds every image case, one ONNX Runtime run,
and one export killed with SIGKILL then redone with --force.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fssam_deploy.model.checkpoint import file_sha256
from fssam_deploy.stages import STAGE_SPECS
from tests.cli_probe import (
    TINY,
    episode_args,
    error_line,
    forbid_expensive_work,
    run_cli,
    snapshot,
    user_folder,
    write_episode,
)

EXPORT = ["export", *TINY, "--no-progress"]


@pytest.fixture(scope="module")
def ep(tmp_path_factory):
    return write_episode(tmp_path_factory.mktemp("episode"))


@pytest.fixture
def guard(monkeypatch):
    forbid_expensive_work(monkeypatch)


def run_args(ep, out, *extra):
    return ["run", *TINY, *episode_args(ep), "--out", str(out), *extra]


# ---------------------------------------------------------------- data loss (refusals)

def test_export_into_user_folder_refused_files_untouched(tmp_path, capsys, guard):
    d = user_folder(tmp_path / "d")
    before = snapshot(d)
    res = run_cli([*EXPORT, "--out", d], capsys)
    error_line(res, r"d: folder exists and holds 2 entries \(notes, thesis\.tex\) but no fssam manifest.*--force")
    assert snapshot(d) == before


def test_export_out_dot_refused_even_with_force(tmp_path, capsys, guard, monkeypatch):
    scratch = user_folder(tmp_path / "scratch")
    monkeypatch.chdir(scratch)
    before = snapshot(tmp_path)
    for force in ([], ["--force"]):
        res = run_cli([*EXPORT, "--out", ".", *force], capsys)
        error_line(res, r"\.: is the current directory .*--force does not override this")
    assert snapshot(tmp_path) == before


def test_run_out_is_the_query_refused(ep, capsys, guard):
    before = snapshot(ep["query"].parent)
    res = run_cli(run_args(ep, ep["query"]), capsys)
    error_line(res, r"--out .*q\.png: .*overwriting the input .*q\.png")
    assert snapshot(ep["query"].parent) == before


def test_run_query_folder_out_same_folder_refused(tmp_path, capsys, guard):
    paths = write_episode(tmp_path / "qs")
    before = snapshot(tmp_path)
    res = run_cli(["run", *TINY, "--query", tmp_path / "qs", "--support", paths["support"], "--support-mask",
                   paths["mask"], "--out", tmp_path / "qs"], capsys)
    error_line(res, r"--out .*qs: the result for .* would be written to .*, overwriting the input")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- silent wrong results (refusals)

@pytest.mark.parametrize("batch", ["-1", "0"])
def test_run_batch_not_positive_refused(ep, tmp_path, capsys, guard, batch):
    res = run_cli(run_args(ep, tmp_path / "m.png", "--batch", batch), capsys)
    error_line(res, rf"--batch {batch}: must be >= 1")
    assert not (tmp_path / "m.png").exists()


def test_export_opset_5_refused(tmp_path, capsys, guard):
    res = run_cli([*EXPORT, "--out", tmp_path / "g", "--opset", "5"], capsys)
    error_line(res, r"--opset 5: .*opset 18 or newer")
    assert not (tmp_path / "g").exists()


# ---------------------------------------------------------------- tracebacks -> one line (refusals)

def _read_only(folder: Path) -> Path:
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        folder.chmod(0o755)
        pytest.skip("this user (root?) can write a read-only folder anyway")
    return folder


def test_run_out_read_only_refused(ep, tmp_path, capsys, guard):
    ro = _read_only(tmp_path / "ro")
    try:
        error_line(run_cli(run_args(ep, ro / "m.png"), capsys), r"--out .*ro/m\.png: folder .*ro is not writable")
    finally:
        ro.chmod(0o755)


def test_run_out_under_a_file_refused(ep, tmp_path, capsys, guard):
    (tmp_path / "afile").write_text("x")
    res = run_cli(run_args(ep, tmp_path / "afile" / "m.png"), capsys)
    error_line(res, r"--out .*afile/m\.png: cannot create folder .*afile is a file")


def test_run_out_without_image_extension_refused(ep, tmp_path, capsys, guard):
    res = run_cli(run_args(ep, tmp_path / "mask"), capsys)
    error_line(res, r"--out .*mask: the mask file needs one of the extensions .*\.png")
    assert not (tmp_path / "mask").exists()


def test_run_logits_under_a_file_refused(ep, tmp_path, capsys, guard):
    (tmp_path / "afile").write_text("x")
    res = run_cli(run_args(ep, tmp_path / "m.png", "--logits", tmp_path / "afile" / "l.npy"), capsys)
    error_line(res, r"--logits .*afile/l\.npy: cannot create folder .*afile is a file")
    assert not (tmp_path / "m.png").exists()  # refused before the mask is written


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_run_device_cuda_without_gpu_refused(ep, tmp_path, capsys, guard):
    error_line(run_cli(run_args(ep, tmp_path / "m.png", "--device", "cuda"), capsys),
               r"--device 'cuda': no CUDA GPU is visible.*use --device cpu")


def test_run_device_tpu_refused(ep, tmp_path, capsys, guard):
    error_line(run_cli(run_args(ep, tmp_path / "m.png", "--device", "tpu"), capsys),
               r"--device 'tpu': .*use cpu, cuda or cuda:N")


def test_export_out_read_only_refused(tmp_path, capsys, guard):
    ro = _read_only(tmp_path / "ro")
    try:
        error_line(run_cli([*EXPORT, "--out", ro / "g"], capsys), r"ro/g: folder .*ro is not writable")
    finally:
        ro.chmod(0o755)


def test_export_out_under_a_file_refused(tmp_path, capsys, guard):
    (tmp_path / "afile").write_text("x")
    error_line(run_cli([*EXPORT, "--out", tmp_path / "afile" / "g"], capsys),
               r"afile/g: cannot create folder .*afile is a file")
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_export_out_symlink_refused(tmp_path, capsys, guard, force):
    target = user_folder(tmp_path / "target")
    (tmp_path / "link").symlink_to(target)
    before = snapshot(tmp_path)
    error_line(run_cli([*EXPORT, "--out", tmp_path / "link", *force], capsys),
               r"link: is a symbolic link \(to .*target\).*never written through links")
    assert snapshot(tmp_path) == before


def test_build_aoti_batch_abc_refused(tmp_path, capsys, guard):
    res = run_cli(["build", "--format", "aoti", *TINY, "--batch", "abc", "--out", tmp_path / "a", "--no-progress"],
                  capsys)
    error_line(res, r"--batch 'abc': .*int")
    assert not (tmp_path / "a").exists()


def test_demo_unknown_backend_refused_fast(tmp_path, capsys, guard, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run_cli(["demo", "--backends", "nope"], capsys)
    error_line(res, r"--backends: unknown 'nope'; choose from torch, .*onnxruntime")
    assert res.seconds < 20, res.seconds
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_image_over_pixel_limit_refused(ep, tmp_path, capsys, guard, monkeypatch):
    monkeypatch.setenv("FSSAM_MAX_PIXELS", "1000")
    res = run_cli(run_args(ep, tmp_path / "m.png"), capsys)
    error_line(res, r"q\.png: image of 64x48 \(0\.0 MPixel\) is over the limit of 0\.001 MPixel.*FSSAM_MAX_PIXELS")


def test_random_bytes_checkpoint_one_line(ep, tmp_path, capsys, guard):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    res = run_cli(run_args(ep, tmp_path / "m.png", "--checkpoint", junk), capsys)
    error_line(res, r"junk\.pth: cannot read checkpoint \(.*\); it is corrupt, truncated")
    assert not (tmp_path / "m.png").exists()


# ---------------------------------------------------------------- artifact folders: refused, one line

def linked_copy(src: Path, dst: Path) -> Path:
    """`src` as a new folder: manifests copied, graphs symbolic links to the (read-only) originals."""
    dst.mkdir()
    for p in src.iterdir():
        if p.suffix == ".json":
            shutil.copy2(p, dst / p.name)
        else:
            (dst / p.name).symlink_to(p)
    return dst


def replace_file(path: Path, data: bytes) -> None:
    path.unlink()  # a link to the shared original: never write through it
    path.write_bytes(data)


def resign(folder: Path, stage: str) -> None:
    """Record the current sha256 of `stage`'s graph in the manifest (a tampered folder that looks intact)."""
    m = json.loads((folder / "manifest.json").read_text())
    entry = m["stages"][stage]
    entry["sha256"] = file_sha256(folder / entry["file"])
    (folder / "manifest.json").write_text(json.dumps(m))


def run_onnx(ep, folder, out, capsys, backend="onnxruntime"):
    return run_cli(run_args(ep, out, "--backend", backend, "--engine-dir", folder), capsys)


def graph(folder: Path, stage: str) -> Path:
    return folder / json.loads((folder / "manifest.json").read_text())["stages"][stage]["file"]


def test_onnx_truncated_graph_refused(tiny_graphs, ep, tmp_path, capsys, guard):
    g = linked_copy(tiny_graphs, tmp_path / "g")
    path = graph(g, "decoder")
    replace_file(path, path.read_bytes()[: path.stat().st_size // 2])
    error_line(run_onnx(ep, g, tmp_path / "m.png", capsys),
               r"decoder\.onnx: graph of stage 'decoder' does not match the manifest's sha256.*fssam export")


def test_onnx_graph_swapped_for_another_stage_refused(tiny_graphs, ep, tmp_path, capsys, guard):
    g = linked_copy(tiny_graphs, tmp_path / "g")
    graph(g, "prior").unlink()
    graph(g, "prior").symlink_to(graph(tiny_graphs, "decoder"))
    error_line(run_onnx(ep, g, tmp_path / "m.png", capsys),
               r"prior\.onnx: graph of stage 'prior' does not match the manifest's sha256")


@pytest.mark.parametrize("text, pattern", [
    ("{not json", r"manifest\.json: unreadable manifest .*fssam export"),
    ("{}", r"manifest\.json: format None, expected 'fssam-onnx/1'"),
    ("[1, 2]", r"manifest\.json: manifest is not a JSON object"),
], ids=["corrupt", "empty-object", "a-list"])
def test_onnx_bad_manifest_refused(tiny_graphs, ep, tmp_path, capsys, guard, text, pattern):
    g = linked_copy(tiny_graphs, tmp_path / "g")
    (g / "manifest.json").write_text(text)
    error_line(run_onnx(ep, g, tmp_path / "m.png", capsys), pattern)


def test_onnx_truncated_graph_resigned_one_line(tiny_graphs, ep, tmp_path, capsys):
    """A graph that matches its manifest but does not parse: ONNX Runtime's InvalidProtobuf as one line."""
    g = linked_copy(tiny_graphs, tmp_path / "g")
    path = graph(g, "image_encoder")
    replace_file(path, path.read_bytes()[:4096])
    resign(g, "image_encoder")
    error_line(run_onnx(ep, g, tmp_path / "m.png", capsys), r"image_encoder\.onnx: .*(load|parse|protobuf).*export")


def test_onnx_graph_of_another_stage_resigned_refused_before_inference(tiny_graphs, ep, tmp_path, capsys,
                                                                       monkeypatch):
    """The decoder's graph under the prior's name, manifest re-signed: refused when opened (the right stage in
    each file), before any stage runs."""
    from fssam_deploy.episode import Episode

    def no_inference(*args, **kwargs):
        raise AssertionError("a stage ran before the wrong graph was refused")

    monkeypatch.setattr(Episode, "_run", no_inference)
    g = linked_copy(tiny_graphs, tmp_path / "g")
    graph(g, "prior").unlink()
    graph(g, "prior").symlink_to(graph(tiny_graphs, "decoder"))
    resign(g, "prior")
    error_line(run_onnx(ep, g, tmp_path / "m.png", capsys), r"prior\.onnx: .*stage.*(prior|decoder)")


@pytest.fixture(scope="module")
def fake_aoti(tmp_path_factory):
    """An AOTInductor folder as `fssam build --format aoti` lays it out (manifest of this torch and CPU, every
    stage listed with its sha256), whose packages are junk bytes: nothing in it can be compiled or loaded."""
    from fssam_deploy.backends.aoti.manifest import build_manifest, device_info
    from fssam_deploy.model import FSSAMConfig

    cfg = FSSAMConfig.from_name("tiny")
    d = tmp_path_factory.mktemp("aoti") / "packages"
    d.mkdir()
    entries = {}
    for name, spec in STAGE_SPECS.items():
        (d / f"{name}.pt2").write_bytes(b"PK\x03\x04 not an AOTInductor package " + name.encode())
        entries[name] = {"file": f"{name}.pt2", "sha256": file_sha256(d / f"{name}.pt2"),
                         "inputs": [{"name": t.name, "shape": list(t.concrete(cfg, 1, 1))} for t in spec.inputs],
                         "outputs": [{"name": t.name} for t in spec.outputs]}
    manifest = build_manifest(cfg, entries, device_info("cpu"), 1, "random:0")
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return d


def test_aoti_folder_run_as_onnxruntime_refused(fake_aoti, ep, tmp_path, capsys, guard):
    error_line(run_onnx(ep, fake_aoti, tmp_path / "m.png", capsys),
               r"manifest\.json: format 'fssam-aoti/1', expected 'fssam-onnx/1'")


def test_aoti_junk_packages_run_one_line(fake_aoti, ep, tmp_path, capsys):
    error_line(run_onnx(ep, fake_aoti, tmp_path / "m.png", capsys, backend="aoti"),
               r"image_encoder\.pt2: .*rebuild with `fssam build --format aoti`")


def test_verify_aoti_folder_one_line(fake_aoti, capsys):
    error_line(run_cli(["verify", "--engine-dir", fake_aoti], capsys),
               r"image_encoder\.pt2: .*rebuild with `fssam build --format aoti`")
