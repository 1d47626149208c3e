"""Issue 16: every subcommand with malformed arguments (missing, wrong types, nonexistent files, unknown choices,
out of range) ends in argparse's usage error (exit 2, `usage:`) or our one `error:` line (exit 1): never a
traceback, never the "this is a bug" line, never any model built or graph loaded, nothing written."""

from __future__ import annotations

import json

import pytest

from fssam_deploy.model import FSSAMConfig
from tests.cli_probe import (
    TINY,
    assert_no_traceback,
    error_line,
    forbid_expensive_work,
    run_cli,
    snapshot,
    user_folder,
    write_episode,
)

EP = ["--query", "{q}", "--support", "{s}", "--support-mask", "{m}"]
RUN = ["run", *TINY, *EP, "--out", "m.png"]
EXPORT = ["export", *TINY, "--out", "g", "--no-progress"]
BUILD = ["build", "--format", "aoti", *TINY, "--out", "b", "--no-progress"]
BENCH = ["bench", *TINY, "--no-progress"]
USAGE, OURS = 2, 1

CASES = {
    "no-command": ([], USAGE),
    "unknown-command": (["nope"], USAGE),
    # run
    "run-no-args": (["run"], USAGE),
    "run-missing-out": (["run", *TINY, *EP], USAGE),
    "run-missing-support": (["run", *TINY, "--query", "{q}", "--out", "m.png"], USAGE),
    "run-image-size-abc": ([*RUN, "--image-size", "abc"], USAGE),
    "run-image-size-100": ([*RUN, "--image-size", "100"], OURS),
    "run-image-size-0": ([*RUN, "--image-size", "0"], OURS),
    "run-num-refine-negative": ([*RUN, "--num-refine", "-1"], OURS),
    "run-refine-v9": ([*RUN, "--refine", "v9"], USAGE),
    "run-sam2-config-nope": ([*RUN, "--sam2-config", "nope"], OURS),
    "run-dino-nope": ([*RUN, "--dino", "nope"], OURS),
    "run-backend-nope": ([*RUN, "--backend", "nope"], USAGE),
    "run-batch-float": ([*RUN, "--batch", "1.5"], USAGE),
    "run-seed-abc": ([*RUN, "--seed", "abc"], USAGE),
    "run-query-missing": (["run", *TINY, "--query", "nope.jpg", *EP[2:], "--out", "m.png"], OURS),
    "run-query-empty-folder": (["run", *TINY, "--query", "{empty}", *EP[2:], "--out", "m.png"], OURS),
    "run-query-not-an-image": (["run", *TINY, "--query", "{afile}", *EP[2:], "--out", "m.png"], OURS),
    "run-support-missing": (["run", *TINY, *EP[:2], "--support", "nope.png", *EP[4:], "--out", "m.png"], OURS),
    "run-mask-missing": (["run", *TINY, *EP[:4], "--support-mask", "nope.png", "--out", "m.png"], OURS),
    "run-two-masks-one-support": ([*RUN, "--support-mask", "{m}"], OURS),
    "run-checkpoint-missing": ([*RUN, "--checkpoint", "nope.pth"], OURS),
    "run-sam2-checkpoint-alone": ([*RUN, "--sam2-checkpoint", "{afile}"], OURS),
    "run-onnxruntime-no-engine-dir": ([*RUN, "--backend", "onnxruntime"], OURS),
    "run-engine-dir-missing": ([*RUN, "--backend", "onnxruntime", "--engine-dir", "nope"], OURS),
    "run-engine-dir-is-a-file": ([*RUN, "--backend", "onnxruntime", "--engine-dir", "{afile}"], OURS),
    "run-engine-dir-user-folder": ([*RUN, "--backend", "onnxruntime", "--engine-dir", "{user}"], OURS),
    "run-tensorrt-not-installed": ([*RUN, "--backend", "tensorrt", "--engine-dir", "nope"], OURS),
    "run-device-tpu": ([*RUN, "--device", "tpu"], OURS),
    "run-device-cuda-abc": ([*RUN, "--device", "cuda:abc"], OURS),
    "run-out-empty": (["run", *TINY, *EP, "--out", ""], OURS),
    "run-logits-empty": ([*RUN, "--logits", ""], OURS),
    "run-out-jpeg-mask": (["run", *TINY, *EP, "--out", "m.jpg"], OURS),
    "run-overlay-unknown-extension": ([*RUN, "--overlay", "ov.xyz"], OURS),
    # export
    "export-no-out": (["export", *TINY], USAGE),
    "export-opset-abc": ([*EXPORT, "--opset", "abc"], USAGE),
    "export-opset-5": ([*EXPORT, "--opset", "5"], OURS),
    "export-shots-0": ([*EXPORT, "--shots", "0"], OURS),
    "export-batch-2": ([*EXPORT, "--batch", "2"], USAGE),
    "export-precision-fp8": ([*EXPORT, "--precision", "fp8"], USAGE),
    "export-checkpoint-missing": ([*EXPORT, "--checkpoint", "nope.pth"], OURS),
    "export-out-is-a-file": (["export", *TINY, "--out", "{afile}"], OURS),
    "export-out-empty": (["export", *TINY, "--out", ""], OURS),
    "export-out-user-folder": (["export", *TINY, "--out", "{user}"], OURS),
    "export-device-tpu": ([*EXPORT, "--device", "tpu"], OURS),
    "export-image-size-100": ([*EXPORT, "--image-size", "100"], OURS),
    # build
    "build-no-format": (["build", "--out", "b"], USAGE),
    "build-format-nope": (["build", "--format", "nope", "--out", "b"], USAGE),
    "build-batch-abc": ([*BUILD, "--batch", "abc"], OURS),
    "build-batch-0": ([*BUILD, "--batch", "0"], OURS),
    "build-batch-negative": ([*BUILD, "--batch", "-1"], OURS),
    "build-shots-0": ([*BUILD, "--shots", "0"], OURS),
    "build-workspace-abc": ([*BUILD, "--workspace", "abc"], USAGE),
    "build-device-tpu": ([*BUILD, "--device", "tpu"], OURS),
    "build-out-is-a-file": (["build", "--format", "aoti", *TINY, "--out", "{afile}"], OURS),
    "build-checkpoint-missing": ([*BUILD, "--checkpoint", "nope.pth"], OURS),
    "build-tensorrt-not-installed": (["build", "--format", "tensorrt", *TINY, "--out", "b", "--onnx-dir", "nope"],
                                     OURS),
    "build-openvino-onnx-dir-missing": (["build", "--format", "openvino", *TINY, "--out", "b", "--onnx-dir",
                                         "nope"], OURS),
    # verify
    "verify-no-args": (["verify"], USAGE),
    "verify-engine-dir-missing": (["verify", "--engine-dir", "nope"], OURS),
    "verify-engine-dir-is-a-file": (["verify", "--engine-dir", "{afile}"], OURS),
    "verify-engine-dir-user-folder": (["verify", "--engine-dir", "{user}"], OURS),
    "verify-batch-abc": (["verify", "--engine-dir", "{aoti}", "--batch", "abc"], USAGE),
    "verify-batch-0": (["verify", "--engine-dir", "{aoti}", "--batch", "0"], OURS),
    "verify-device-tpu": (["verify", "--engine-dir", "{aoti}", "--device", "tpu"], OURS),
    "verify-json-under-a-file": (["verify", "--engine-dir", "{graphs}", "--json", "{afile}/report.json"], OURS),
    "verify-checkpoint-missing": (["verify", "--engine-dir", "{graphs}", "--checkpoint", "nope.pth"], OURS),
    # bench
    "bench-backends-nope": ([*BENCH, "--backends", "nope"], OURS),
    "bench-backends-commas": ([*BENCH, "--backends", ","], OURS),
    "bench-batch-abc": ([*BENCH, "--batch", "abc"], OURS),
    "bench-batch-0": ([*BENCH, "--batch", "1,0"], OURS),
    "bench-shots-0": ([*BENCH, "--shots", "0"], OURS),
    "bench-warmup-negative": ([*BENCH, "--warmup", "-1"], OURS),
    "bench-iters-0": ([*BENCH, "--iters", "0"], OURS),
    "bench-iters-abc": ([*BENCH, "--iters", "abc"], USAGE),
    "bench-threads-negative": ([*BENCH, "--threads", "-2"], OURS),
    "bench-device-tpu": ([*BENCH, "--device", "tpu"], OURS),
    "bench-torch-fused-on-cpu": ([*BENCH, "--backends", "torch-fused"], OURS),
    "bench-engine-dir-missing": ([*BENCH, "--backends", "onnxruntime", "--engine-dir", "nope"], OURS),
    "bench-checkpoint-missing": ([*BENCH, "--checkpoint", "nope.pth"], OURS),
    "bench-out-is-a-file": ([*BENCH, "--out", "{afile}"], OURS),
    # demo
    "demo-backends-nope": (["demo", "--backends", "nope"], OURS),
    "demo-backends-commas": (["demo", "--backends", ","], OURS),
    "demo-preset-nope": (["demo", "--preset", "nope"], OURS),
    "demo-iters-0": (["demo", "--iters", "0"], OURS),
    "demo-iters-abc": (["demo", "--iters", "abc"], USAGE),
    "demo-seed-abc": (["demo", "--seed", "abc"], USAGE),
    "demo-device-tpu": (["demo", "--device", "tpu"], OURS),
    "demo-torch-fused-on-cpu": (["demo", "--backends", "torch-fused", "--device", "cpu"], OURS),
    "demo-out-dir-is-a-file": (["demo", "--out-dir", "{afile}"], OURS),
    "demo-out-dir-user-folder": (["demo", "--out-dir", "{user}"], OURS),
    # tune and --backend / --precision auto (the cache is the test's own, empty: FSSAM_CACHE_DIR)
    "tune-backends-nope": (["tune", *TINY, "--backends", "nope", "--no-progress"], OURS),
    "tune-torch-fused-on-cpu": (["tune", *TINY, "--backends", "torch-fused", "--no-progress"], OURS),
    "tune-shots-0": (["tune", *TINY, "--shots", "0", "--no-progress"], OURS),
    "tune-iters-0": (["tune", *TINY, "--iters", "0", "--no-progress"], OURS),
    "tune-threads-negative": (["tune", *TINY, "--threads", "-1", "--no-progress"], OURS),
    "tune-device-tpu": (["tune", *TINY, "--device", "tpu", "--no-progress"], OURS),
    "run-backend-auto-untuned": ([*RUN, "--backend", "auto"], OURS),
    "run-accuracy-nope": ([*RUN, "--backend", "auto", "--accuracy", "best"], USAGE),
    "export-precision-auto-untuned": ([*EXPORT, "--precision", "auto"], OURS),
    "build-precision-auto-untuned": (["build", "--format", "aoti", *TINY, "--out", "b", "--precision", "auto"],
                                     OURS),
    "export-triton-repo-static-batch": ([*EXPORT, "--triton-repo", "repo"], OURS),
    "eval-unknown-flag": (["eval", "--nope-flag"], USAGE),
    "serve-unknown-flag": (["serve", "--nope-flag"], USAGE),
    "serve-instances-0": (["serve", *TINY, "--instances", "0"], OURS),
    "serve-max-batch-negative": (["serve", *TINY, "--max-batch", "-1"], OURS),
    "serve-exit-timeout-over-pytriton": (["serve", *TINY, "--exit-timeout", "60"], OURS),
    "serve-port-out-of-range": (["serve", *TINY, "--http-port", "70000"], OURS),
    "serve-max-request-mb-0": (["serve", *TINY, "--max-request-mb", "0"], OURS),
    "client-unknown-flag": (["client", "--nope-flag"], USAGE),
}


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """The files the cases name: an episode, a text file, an empty folder, a user's folder, a minimal AOTI folder."""
    d = tmp_path_factory.mktemp("fuzz")
    ep = write_episode(d / "ep")
    (d / "afile.txt").write_text("not an image, not a checkpoint, not a folder\n")
    (d / "empty").mkdir()
    user_folder(d / "user")
    (d / "aoti").mkdir()
    tiny = FSSAMConfig.from_name("tiny").to_dict()  # valid up to the config: the device is checked before the rest
    (d / "aoti" / "manifest.json").write_text(json.dumps({"format": "fssam-aoti/1", "config": tiny}))
    return {"dir": d, "q": ep["query"], "s": ep["support"], "m": ep["mask"], "afile": d / "afile.txt",
            "empty": d / "empty", "user": d / "user", "aoti": d / "aoti"}


def test_every_subcommand_is_probed(capsys):
    """The cases cover every subcommand `fssam --help` lists."""
    from fssam_deploy.cli import make_parser

    parser = make_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    probed = {argv[0] for argv, _ in CASES.values() if argv}
    assert set(sub.choices) <= probed, sorted(set(sub.choices) - probed)


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_arguments(case, places, tmp_path, monkeypatch, capsys, request):
    argv, expected = CASES[case]
    values = {k: str(v) for k, v in places.items()}
    if any("{graphs}" in a for a in argv):
        values["graphs"] = str(request.getfixturevalue("tiny_graphs"))
    argv = [a.format(**values) for a in argv]
    forbid_expensive_work(monkeypatch)
    monkeypatch.setenv("FSSAM_CACHE_DIR", str(tmp_path / "cache"))  # an untuned machine
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = snapshot(places["dir"])
    res = run_cli(argv, capsys)
    assert_no_traceback(res)
    if expected == USAGE:
        assert res.rc == 2 and "usage: fssam" in res.err, (res.rc, res.err)
    else:
        error_line(res, r"^error: \S")
    assert list(cwd.iterdir()) == [], "a refused command wrote files"
    assert snapshot(places["dir"]) == before, "a refused command changed its inputs"
