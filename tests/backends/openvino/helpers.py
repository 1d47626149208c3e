"""Cheap private copies of an IR folder: hard links (no bytes copied), a file replaced rather than modified."""

from __future__ import annotations

import json
import os
from pathlib import Path


def linked_copy(src: Path, dst: Path) -> Path:
    """`dst` with a hard link to every file of `src`. Never write into a linked file: `replace_file` it."""
    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        os.link(f, dst / f.name)
    return dst


def replace_file(path: Path, data: bytes) -> None:
    """Give `path` new content without touching the file it was linked to."""
    path.unlink()
    path.write_bytes(data)


def edit_manifest(folder: Path, edit) -> None:
    """Apply `edit(dict)` to `folder/manifest.json` (replaced, not written through the link)."""
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    replace_file(path, json.dumps(data).encode())
