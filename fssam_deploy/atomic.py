"""Atomic artifact folders that never delete what the tool did not create.

`atomic_dir(out)` writes into a locked temporary sibling `.{name}.fssam-tmp-<pid>-<token>/` and swaps it in
only when the writer finished: the old folder is renamed aside (`.{name}.fssam-old-<pid>-<token>`), the new
one renamed in, the old one deleted. Before writing, `check_output_dir` refuses (ConfigError):
- an existing non-empty `out` that is not an artifact folder of ours (its `manifest.json` has a `format`
  starting with "fssam-"), unless `force`;
- always, even with `force`: the filesystem root, the home folder, the current directory or any of its parents,
  a folder holding one of the `protect`ed inputs, an existing file, and a symbolic link (an artifact folder is
  never written through a link: give the link's target instead);
- a parent that cannot be created or written (read-only, under a file).
A writer killed with SIGKILL leaves its temporary folder behind; the next `atomic_dir` in the same parent
removes every stale one of ours: its lock is free (the writer died), or it has no lock and its pid is dead
or it is older than `max_age_s`. A stale `-old-` folder whose target is missing is renamed back.
Nothing else in the parent is touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from fssam_deploy.errors import ConfigError, EngineError
from fssam_deploy.preflight import check_writable_folder

MANIFEST_NAME = "manifest.json"
OUR_FORMAT_PREFIX = "fssam-"
LOCK_NAME = ".lock"
STALE_AFTER_S = 24 * 3600
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.fssam-(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})$")


def is_artifact_dir(path: str | os.PathLike) -> bool:
    """True when `path/manifest.json` is a JSON object whose `format` starts with "fssam-"."""
    try:
        doc = json.loads((Path(path) / MANIFEST_NAME).read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("format"), str) and doc["format"].startswith(OUR_FORMAT_PREFIX)


def _refuse_always(raw: Path, out: Path, protect: Iterable) -> None:
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if out == Path(out.anchor):
        raise ConfigError(f"{raw}: is the filesystem root; choose a new folder for the output")
    if out == home:
        raise ConfigError(f"{raw}: is your home folder; choose a new folder for the output")
    if cwd == out or cwd.is_relative_to(out):
        raise ConfigError(f"{raw}: is the current directory or one of its parents, which would be replaced; choose a "
                          "new folder for the output (--force does not override this)")
    for p in protect:
        pr = Path(os.path.abspath(p)).resolve()
        if pr == out or pr.is_relative_to(out):
            raise ConfigError(f"{raw}: holds the input {p}, which replacing it would delete; choose another output "
                              "folder (--force does not override this)")


def check_output_dir(out_dir: str | os.PathLike, force: bool = False,
                     is_ours: Callable[[Path], bool] = is_artifact_dir, protect: Iterable = ()) -> Path:
    """The real path `atomic_dir` would write, after every check it makes before the work (see the module doc).

    Call it on its own before building a model, so a bad `--out` fails in a second, not after the export.
    """
    if not str(out_dir).strip():
        raise ConfigError("the output folder is empty; give a folder path")
    raw = Path(out_dir)
    if raw.is_symlink():
        raise ConfigError(f"{raw}: is a symbolic link (to {os.readlink(raw)}); artifact folders are never written "
                          f"through links: give the folder itself ({raw.resolve()}) or a new path")
    out = Path(os.path.abspath(raw)).resolve()
    _refuse_always(raw, out, protect)
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"{raw}: exists and is a file, not a folder; choose a folder path (a file is never "
                              "replaced, even with --force)")
        try:
            entries = sorted(e.name for e in os.scandir(out))
        except OSError as exc:
            raise ConfigError(f"{raw}: cannot list the existing folder ({exc.strerror or exc})") from None
        if entries and not force and not is_ours(out):
            shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
            count = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
            raise ConfigError(f"{raw}: folder exists and holds {count} ({shown}) but no fssam "
                              "manifest, so it is not an artifact folder written by this tool; choose a new or empty "
                              "folder, or pass --force to replace it (its contents are deleted)")
    check_writable_folder(out.parent, str(raw))
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


def _is_stale(path: Path, pid: int, max_age_s: float) -> bool:
    """A temp folder of ours is stale when its lock is free, or it has no lock and its writer is gone or old."""
    try:
        fd = os.open(path / LOCK_NAME, os.O_RDONLY)
    except OSError:
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return False
        return not _pid_alive(pid) or age > max_age_s
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # a live writer holds it
    finally:
        os.close(fd)  # also releases the probe's lock
    return True


def clean_stale_temps(parent: str | os.PathLike, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the stale temporary folders of ours in `parent` (see the module doc); -> the paths removed."""
    parent = Path(parent)
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    removed = []
    for entry in entries:
        m = TEMP_RE.match(entry.name)
        if not m or not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        if not _is_stale(path, int(m["pid"]), max_age_s):
            continue
        target = parent / m["name"]
        if m["kind"] == "old" and not os.path.lexists(target):
            with contextlib.suppress(OSError):  # left in place if it cannot go back
                os.rename(path, target)  # killed mid-swap: the previous artifact goes back
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _swap_in(tmp: Path, out: Path, token: str, recheck: Callable[[], object]) -> None:
    """Move the finished `tmp` to `out`: old aside, new in, old deleted; on failure the old one is put back."""
    old = None
    try:
        if os.path.lexists(out):
            recheck()  # something may have appeared at `out` during the work
            old = out.with_name(f".{out.name}.fssam-old-{os.getpid()}-{token}")
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException as exc:
        if old is not None and not os.path.lexists(out):
            os.rename(old, out)
        if isinstance(exc, OSError):
            raise EngineError(f"{out}: could not move the finished output into place ({exc.strerror or exc}); the "
                              "previous folder is unchanged") from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _locked_temp(out: Path, label: str):
    """-> (a new locked temp folder `.{out.name}.fssam-tmp-<pid>-<token>` next to `out`, its token, the lock file)."""
    token = secrets.token_hex(4)
    tmp = out.with_name(f".{out.name}.fssam-tmp-{os.getpid()}-{token}")
    try:
        tmp.mkdir()
        lock = open(tmp / f"{LOCK_NAME}.new", "w")  # noqa: SIM115 - held open (locked) for the whole write
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        os.rename(tmp / f"{LOCK_NAME}.new", tmp / LOCK_NAME)  # visible only once locked: no window for a cleaner
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"{label}: cannot write in {out.parent} ({exc.strerror or exc})") from None
    return tmp, token, lock


def _prepare_parent(out: Path, label: str, max_age_s: float) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{label}: cannot create its folder {out.parent} ({exc.strerror or exc})") from None
    clean_stale_temps(out.parent, max_age_s)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, force: bool = False, is_ours: Callable[[Path], bool] = is_artifact_dir,
               protect: Iterable = (), max_age_s: float = STALE_AFTER_S) -> Iterator[Path]:
    """Yield a locked temporary sibling of `out_dir` to write into; on success it replaces `out_dir`.

    Checks first (`check_output_dir`: refusals and `force` as in the module doc), then removes stale temporary
    folders of ours next to it. On any failure (exceptions and KeyboardInterrupt included) the temporary folder
    is removed and an existing `out_dir` is left as it was.
    """
    protect = list(protect)
    out = check_output_dir(out_dir, force, is_ours, protect)
    _prepare_parent(out, str(out_dir), max_age_s)
    tmp, token, lock = _locked_temp(out, str(out_dir))
    try:
        yield tmp
        (tmp / LOCK_NAME).unlink()  # the fd keeps the lock until the swap is done
        _swap_in(tmp, out, token, lambda: check_output_dir(out, force, is_ours, protect))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        lock.close()


@contextlib.contextmanager
def scratch_dir(near: str | os.PathLike, max_age_s: float = STALE_AFTER_S) -> Iterator[Path]:
    """A locked scratch folder next to `near` (same disk, for big intermediate files), always removed at the end;
    one a SIGKILL leaves behind is cleaned by the next atomic_dir or scratch_dir there, like atomic_dir's."""
    near = Path(os.path.abspath(near))
    _prepare_parent(near, str(near), max_age_s)
    tmp, _, lock = _locked_temp(near, str(near))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lock.close()
