"""Helpers every artifact writer and reader shares: atomic output folders, manifest reading, the host's CPU name."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from fssam_deploy.atomic import atomic_dir, check_output_dir, is_artifact_dir  # noqa: F401 - re-exported
from fssam_deploy.errors import EngineError
from fssam_deploy.model.checkpoint import file_sha256


def read_json_manifest(path: Path, fmt: str, missing: str, rebuild: str) -> dict:
    """The manifest at `path`, refused (EngineError naming the file) when absent (`missing`: what to do), not JSON
    or of another format than `fmt` (`rebuild`: the command that writes a good one)."""
    if not path.is_file():
        raise EngineError(f"{path}: {missing}")
    try:
        manifest = json.loads(path.read_bytes())
    except OSError as exc:
        raise EngineError(f"{path}: cannot read the manifest ({exc.strerror or exc}); {rebuild}") from exc
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8/16/32, nested too deep
        raise EngineError(f"{path}: unreadable manifest ({type(exc).__name__}: {str(exc)[:200]}); {rebuild}") from exc
    if not isinstance(manifest, dict):
        raise EngineError(f"{path}: manifest is a JSON {type(manifest).__name__}, not an object; {rebuild}")
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
