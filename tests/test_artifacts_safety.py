"""atomic_dir never deletes what the tool did not create, fails before the work, and cleans up after a SIGKILL."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from pathlib import Path

import pytest

from fssam_deploy.atomic import atomic_dir, check_output_dir, clean_stale_temps, is_artifact_dir, scratch_dir
from fssam_deploy.errors import ConfigError


def snapshot(folder: Path) -> dict:
    """Every entry under `folder` (hidden ones too) with the bytes of its files."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(folder.rglob("*"))}


def ours(folder: Path, tag: str = "v1") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"format": "fssam-onnx/1"}))
    (folder / "graph.onnx").write_text(tag)
    return folder


def write_artifact(out, tag: str = "new", **kw) -> Path:
    with atomic_dir(out, **kw) as tmp:
        (tmp / "manifest.json").write_text(json.dumps({"format": "fssam-onnx/1"}))
        (tmp / "graph.onnx").write_text(tag)
    return Path(out)


# --- never delete what we did not create --------------------------------------------------------------------------

def test_existing_foreign_folder_is_refused_then_forced(tmp_path):
    """Issue 16: `fssam export --out d` when d held files deleted them, exit 0."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    (d / "notes").mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"d: folder exists and holds 2 entries \(notes, thesis\.tex\) but no fssam "
                                          r"manifest, .* or pass --force to replace it \(its contents are deleted\)"):
        write_artifact(d)
    with pytest.raises(ConfigError, match="pass --force"):
        check_output_dir(d)
    assert snapshot(tmp_path) == before
    write_artifact(d, force=True)
    assert sorted(p.name for p in d.iterdir()) == ["graph.onnx", "manifest.json"]


def test_a_foreign_manifest_is_not_ours(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"format": "someone-else/1"}))
    with pytest.raises(ConfigError, match="no fssam manifest"):
        write_artifact(d)
    for text in ("{", "[]", '{"format": 3}', "\xff"):
        (d / "manifest.json").write_text(text)
        assert not is_artifact_dir(d)


def test_our_artifact_folder_is_replaced(tmp_path):
    d = ours(tmp_path / "d", "old")
    (tmp_path / "keep.txt").write_text("user file")
    write_artifact(d, "new")
    assert (d / "graph.onnx").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "keep.txt"]  # no temp or old folder left


def test_empty_folder_and_new_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    write_artifact(tmp_path / "empty")
    write_artifact(tmp_path / "a" / "b" / "new")
    assert (tmp_path / "a" / "b" / "new" / "graph.onnx").is_file()


@pytest.mark.parametrize("force", [False, True])
def test_cwd_and_its_parents_are_refused_even_with_force(tmp_path, monkeypatch, force):
    """Issue 16: `cd scratch; fssam export --out .` deleted every file of the current directory."""
    scratch = tmp_path / "scratch" / "deep"
    scratch.mkdir(parents=True)
    (scratch / "data.csv").write_text("1,2")
    monkeypatch.chdir(scratch)
    before = snapshot(tmp_path)
    for out in (".", "..", str(scratch), str(tmp_path)):
        with pytest.raises(ConfigError, match=r"is the current directory or one of its parents, which would be "
                                              r"replaced; .* \(--force does not override this\)"):
            write_artifact(out, force=force)
    assert snapshot(tmp_path) == before


def test_root_and_home_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^/: is the filesystem root"):
        check_output_dir("/", force=True)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(ConfigError, match=r"home: is your home folder"):
        check_output_dir(home, force=True)


def test_folder_holding_an_input_is_refused(tmp_path):
    """`fssam build --onnx-dir g --out g` (or a parent of it) would delete its own source."""
    g = ours(tmp_path / "g")
    for out in (g, tmp_path):
        with pytest.raises(ConfigError, match=r"holds the input .*g, which replacing it would delete"):
            check_output_dir(out, force=True, protect=[g])


def test_a_file_is_never_replaced(tmp_path):
    (tmp_path / "out").write_text("precious")
    with pytest.raises(ConfigError, match=r"out: exists and is a file, not a folder; .* even with --force"):
        write_artifact(tmp_path / "out", force=True)
    assert (tmp_path / "out").read_text() == "precious"


def test_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    """Decision: artifact folders are never written through links (the link would be replaced, or the target
    deleted); the message names the target to use instead."""
    target = ours(tmp_path / "real")
    (tmp_path / "link").symlink_to(target)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"link: is a symbolic link \(to .*real\); artifact folders are never "
                                          r"written through links: give the folder itself \(.*real\)"):
        write_artifact(tmp_path / "link", force=True)
    assert snapshot(tmp_path) == before
    write_artifact(target)  # the real folder is fine


# --- fail fast: parent checks -------------------------------------------------------------------------------------

def test_out_under_a_file_fails_before_the_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    ran = []
    with pytest.raises(ConfigError, match=r"afile/out: cannot create folder .*afile: .*afile is a file"):
        with atomic_dir(tmp_path / "afile" / "out"):
            ran.append(1)
    assert not ran
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=r"ro/out: folder .*ro is not writable"):
            check_output_dir(ro / "out")
    finally:
        ro.chmod(0o755)


def test_unwritable_parent(tmp_path, monkeypatch):
    import tempfile

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(ConfigError, match=r"out: folder .* is not writable \(Read-only file system\)"):
        with atomic_dir(tmp_path / "out"):
            pytest.fail("the body must not run")
    assert list(tmp_path.iterdir()) == []


def test_check_output_dir_creates_nothing(tmp_path):
    out = check_output_dir(tmp_path / "a" / "b")
    assert out == (tmp_path / "a" / "b").resolve()
    assert list(tmp_path.iterdir()) == []


# --- failures and the lock ----------------------------------------------------------------------------------------

def test_failure_inside_keeps_the_old_folder(tmp_path):
    d = ours(tmp_path / "d", "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(d) as tmp:
            (tmp / "graph.onnx").write_text("half")
            raise KeyboardInterrupt
    assert (d / "graph.onnx").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_temp_folder_is_locked_and_lock_not_in_the_result(tmp_path):
    with atomic_dir(tmp_path / "d") as tmp:
        assert tmp.name.startswith(".d.fssam-tmp-")
        fd = os.open(tmp / ".lock", os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert clean_stale_temps(tmp_path) == []  # a live writer's folder is kept
        (tmp / "manifest.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["manifest.json"]


def test_something_appearing_at_out_during_the_work_is_not_replaced(tmp_path):
    with pytest.raises(ConfigError, match="no fssam manifest"):
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("new")
            (tmp_path / "d").mkdir()
            (tmp_path / "d" / "user.txt").write_text("created meanwhile")
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
    assert (tmp_path / "d" / "user.txt").read_text() == "created meanwhile"


def test_scratch_dir_is_locked_and_always_removed(tmp_path):
    """For intermediate files next to the output (export_int8's fp32 graphs): same naming and lock as atomic_dir."""
    with pytest.raises(RuntimeError):
        with scratch_dir(tmp_path / "int8") as scratch:
            assert scratch.name.startswith(".int8.fssam-tmp-") and scratch.parent == tmp_path
            (scratch / "big.onnx").write_text("x")
            assert clean_stale_temps(tmp_path) == []
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []


# --- stale temporary folders --------------------------------------------------------------------------------------

def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_stale_temp_folders_of_ours_are_removed_and_nothing_else(tmp_path):
    dead = _dead_pid()
    free_lock = tmp_path / f".a.fssam-tmp-{os.getpid()}-00000001"  # lock file present, not held: its writer died
    free_lock.mkdir()
    (free_lock / ".lock").write_text("1")
    held = tmp_path / ".b.fssam-tmp-1-00000002"  # lock held: a live writer
    held.mkdir()
    (held / ".lock").write_text("1")
    dead_pid = tmp_path / f".c.fssam-tmp-{dead}-00000003"  # no lock, its pid is gone
    dead_pid.mkdir()
    young = tmp_path / f".d.fssam-tmp-{os.getpid()}-00000004"  # no lock, live pid, young: being set up
    young.mkdir()
    aged = tmp_path / f".e.fssam-tmp-{os.getpid()}-00000005"  # no lock, live pid, but older than max age
    aged.mkdir()
    os.utime(aged, (time.time() - 25 * 3600,) * 2)
    user = [tmp_path / ".d.abc12345", tmp_path / "f.fssam-tmp-1-00000006", tmp_path / ".g.fssam-tmp-x-00000007"]
    for p in user:
        p.mkdir()
    (tmp_path / ".h.fssam-tmp-1-00000008").write_text("a file, not ours")
    (tmp_path / ".i.fssam-tmp-1-00000009").symlink_to(user[0])
    fd = os.open(held / ".lock", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        removed = clean_stale_temps(tmp_path)
    finally:
        os.close(fd)
    assert sorted(p.name for p in removed) == sorted(p.name for p in (free_lock, dead_pid, aged))
    assert all(p.exists() for p in (held, young, *user))
    assert (tmp_path / ".h.fssam-tmp-1-00000008").is_file() and (tmp_path / ".i.fssam-tmp-1-00000009").is_symlink()


def test_stale_old_folder_is_put_back_when_its_target_is_missing(tmp_path):
    """Killed between 'old aside' and 'new in': the previous artifact is restored, not deleted."""
    old = ours(tmp_path / f".d.fssam-old-{_dead_pid()}-0000000a", "previous")
    assert clean_stale_temps(tmp_path) == []
    assert (tmp_path / "d" / "graph.onnx").read_text() == "previous" and not old.exists()


def _writer(out: Path, ready_w: int) -> None:
    """Child: write into atomic_dir slowly, report the temp folder, wait to be killed."""
    try:
        with atomic_dir(out) as tmp:
            (tmp / "graph.onnx").write_bytes(b"x" * 100_000)
            os.write(ready_w, str(tmp).encode())
            time.sleep(60)
    finally:
        os._exit(3)


def test_sigkill_mid_write_leaves_nothing_the_next_run_does_not_clean(tmp_path):
    """Issue 16: SIGKILL during `fssam export` left a hidden sibling folder that no later run removed."""
    (tmp_path / "user.txt").write_text("keep")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "f").write_text("keep too")
    out = ours(tmp_path / "exp1", "previous")
    user_before = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("exp1")}
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        _writer(out, ready_w)
    os.close(ready_w)
    try:
        tmp = Path(os.read(ready_r, 4096).decode())
        assert tmp.is_dir() and tmp.name.startswith(".exp1.fssam-tmp-")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
    assert tmp.is_dir()  # the killed writer's folder is left behind ...
    assert (out / "graph.onnx").read_text() == "previous"  # ... and the old artifact is intact
    write_artifact(out, "second run")  # ... until the next run on the same out
    assert not tmp.exists()
    assert (out / "graph.onnx").read_text() == "second run"
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("exp1")} == user_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp1", "other", "user.txt"]
