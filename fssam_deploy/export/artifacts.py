"""Helpers every artifact writer and reader shares: atomic output folders, manifest reading, the host's CPU name."""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import EngineError
from ..model.checkpoint import file_sha256


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir` to write into; on success it replaces `out_dir`.

    On any failure (exceptions and KeyboardInterrupt included) the temporary folder is removed
    and an existing `out_dir` is left as it was.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json_manifest(path: Path, fmt: str, missing: str, rebuild: str) -> dict:
    """The manifest at `path`, refused (EngineError naming the file) when absent (`missing`: what to do), not JSON
    or of another format than `fmt` (`rebuild`: the command that writes a good one)."""
    if not path.is_file():
        raise EngineError(f"{path}: {missing}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EngineError(f"{path}: unreadable manifest ({exc}); {rebuild}") from exc
    if manifest.get("format") != fmt:
        raise EngineError(f"{path}: format {manifest.get('format')!r}, expected {fmt!r}; {rebuild}")
    return manifest


def config_diff(built: dict, wanted: dict) -> dict:
    """{field: (built value, wanted value)} for every config field that differs (missing fields count)."""
    return {k: (built.get(k), wanted.get(k)) for k in sorted(set(built) | set(wanted)) if built.get(k) != wanted.get(k)}


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def checked_artifact(folder: str | Path, manifest: dict, stage: str, kind: str, rebuild: str) -> Path:
    """The path of `stage`'s `kind` ("package", "engine") in `folder`, after checking that the manifest
    lists it and that it is present and unchanged (sha256); otherwise an EngineError ending in `rebuild`."""
    folder = Path(folder)
    if stage not in manifest["stages"]:
        raise EngineError(f"{folder}: no {kind} for stage {stage!r} (built: {sorted(manifest['stages'])}); {rebuild}")
    entry = manifest["stages"][stage]
    path = folder / entry["file"]
    if not path.is_file():
        raise EngineError(f"{path}: {kind} of stage {stage!r} is missing; {rebuild}")
    if file_sha256(path) != entry["sha256"]:
        raise EngineError(f"{path}: {kind} content does not match the manifest's sha256 (modified or replaced after "
                          f"the build); {rebuild}")
    return path
