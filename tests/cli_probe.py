"""Probing the `fssam` command as a user would (issue 16): run it in-process, read its one `error:` line,
snapshot folders to prove nothing was touched, and a guard that fails a test the moment a model is built or
a graph is loaded (a refusal that must come before the expensive work)."""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import TINY_FLAGS

TINY = TINY_FLAGS
BUG_LINE = "this is a bug"


@dataclass
class CliResult:
    rc: int
    out: str
    err: str
    seconds: float


def run_cli(argv: list[str], capsys) -> CliResult:
    """`fssam ARGV` in-process; argparse's SystemExit becomes its exit code."""
    from fssam_deploy.cli import main

    capsys.readouterr()  # drop whatever an earlier step printed
    t0 = time.perf_counter()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    seconds = time.perf_counter() - t0
    cap = capsys.readouterr()
    return CliResult(rc, cap.out, cap.err, seconds)


def assert_no_traceback(res: CliResult) -> None:
    text = res.out + res.err
    assert "Traceback" not in text, text
    assert BUG_LINE not in text, text


def error_line(res: CliResult, pattern: str) -> str:
    """Assert the command failed with exit 1 and one `error: ...` line (the last line) matching `pattern`."""
    assert_no_traceback(res)
    lines = [line for line in res.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert res.rc == 1, f"exit {res.rc}, expected 1\nstdout:\n{res.out}\nstderr:\n{res.err}"
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one final `error:` line:\n{res.err}"
    assert re.search(pattern, errors[0]), f"{errors[0]!r} does not match {pattern!r}"
    return errors[0]


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder` (links not followed): kind, size, mtime and content hash of files."""
    shot = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            st = p.lstat()
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                shot[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                shot[rel] = ("dir", st.st_mode)
            else:
                shot[rel] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return shot


def user_folder(folder: Path) -> Path:
    """A folder of someone's own files (no fssam manifest), with a subfolder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.tex").write_text("years of work\n")
    (folder / "notes").mkdir(exist_ok=True)
    (folder / "notes" / "todo.txt").write_text("do not delete\n")
    return folder


class ExpensiveWork(Exception):
    """Raised by the guard: a model was built or a graph loaded before the bad input was refused."""


def forbid_expensive_work(monkeypatch) -> None:
    """Building the SAM 2 + DINOv2 weights or opening an ONNX Runtime session raises ExpensiveWork."""
    import onnxruntime

    from fssam_deploy.model.fssam import FSSAMWeights

    def model(*args, **kwargs):
        raise ExpensiveWork("the model was built before the bad input was refused (check it first)")

    def session(*args, **kwargs):
        raise ExpensiveWork("an ONNX Runtime session was created before the bad input was refused")

    monkeypatch.setattr(FSSAMWeights, "__init__", model)
    monkeypatch.setattr(onnxruntime, "InferenceSession", session)


def write_episode(folder: Path, size: tuple[int, int] = (64, 48)) -> dict[str, Path]:
    """A small query, support and binary support mask (PNG, `size` = W x H) in `folder`."""
    from fssam_deploy.synthetic import synthetic_episode

    folder.mkdir(parents=True, exist_ok=True)
    q, _, sups, masks = synthetic_episode(64, shots=1, seed=5)
    paths = {"query": folder / "q.png", "support": folder / "s.png", "mask": folder / "m.png"}
    Image.fromarray(q).resize(size).save(paths["query"])
    Image.fromarray(sups[0]).resize(size).save(paths["support"])
    Image.fromarray((masks[0] * 255).astype(np.uint8)).resize(size, Image.NEAREST).save(paths["mask"])
    return paths


def episode_args(paths: dict[str, Path]) -> list[str]:
    return ["--query", str(paths["query"]), "--support", str(paths["support"]), "--support-mask", str(paths["mask"])]
