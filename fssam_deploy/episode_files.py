"""Episodes from image files: load, check, resize, segment, and plan where the results go.

`plan_outputs` decides every output path before any model is built: outputs never overwrite an input
(query, support or mask file) or each other, `--out` is a folder for several queries and an image file
for one, and every output folder can be created and written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fssam_deploy.errors import ConfigError, InputError
from fssam_deploy.imageio import (
    IMAGE_SUFFIXES,
    MASK_SUFFIXES,
    image_to_tensor,
    logits_to_original,
    mask_to_tensor,
    read_image,
    read_mask,
)
from fssam_deploy.preflight import check_positive, check_writable_folder


@dataclass
class SupportSet:
    images: torch.Tensor  # (1, K, 3, S, S) 0..255
    masks: torch.Tensor  # (1, K, S, S) {0, 1}
    paths: list[Path]


@dataclass
class QueryResult:
    path: Path
    logits: np.ndarray  # (H, W) float32 at the query's original size
    mask: np.ndarray  # (H, W) bool


@dataclass(frozen=True)
class OutputPlan:
    """Where one query's results go (None: not asked for)."""

    query: Path
    mask: Path
    logits: Path | None = None
    overlay: Path | None = None


def load_supports(images: list, masks: list, size: int) -> SupportSet:
    """Read K support images and their masks; each mask must match its image's size (both as displayed)."""
    if not images:
        raise InputError("at least one --support image is needed")
    if len(images) != len(masks):
        raise InputError(f"{len(images)} support image(s) but {len(masks)} support mask(s): give one "
                         "--support-mask per --support, in the same order")
    imgs, ms = [], []
    for ip, mp in zip(images, masks):
        img, m = read_image(ip), read_mask(mp)
        if img.shape[:2] != m.shape:
            raise InputError(f"{mp}: mask is {m.shape[1]}x{m.shape[0]} (WxH) but its support {ip} is "
                             f"{img.shape[1]}x{img.shape[0]}")
        imgs.append(image_to_tensor(img, size))
        ms.append(mask_to_tensor(m, size))
    return SupportSet(torch.stack(imgs)[None], torch.stack(ms)[None], [Path(p) for p in images])


def segment_queries(pipeline, supports: SupportSet, queries: list, batch: int = 1, device="cpu"):
    """Segment every query against one support set, encoded once; yields QueryResult."""
    batch = check_positive("--batch", batch)
    size = pipeline.cfg.image_size
    session = pipeline.with_supports(supports.images.to(device), supports.masks.to(device))
    for start in range(0, len(queries), batch):
        chunk = [Path(p) for p in queries[start : start + batch]]
        imgs = [read_image(p) for p in chunk]
        x = torch.stack([image_to_tensor(i, size) for i in imgs]).to(device)
        logits = session.segment(x).cpu()
        for p, img, lg in zip(chunk, imgs, logits):
            full = logits_to_original(lg, img.shape[:2])
            yield QueryResult(p, full.numpy().astype(np.float32), (torch.sigmoid(full) >= 0.5).numpy())


# (flag, extension written in folder mode, extensions accepted for a single file, what it holds)
OUTPUT_KINDS = {
    "mask": ("--out", ".png", MASK_SUFFIXES, "mask"),
    "logits": ("--logits", ".npy", {".npy"}, "logits"),
    "overlay": ("--overlay", ".png", IMAGE_SUFFIXES, "overlay"),
}


def _key(path: Path) -> str:
    return os.path.normcase(str(Path(os.path.abspath(path)).resolve()))


def _unique_queries(queries: Iterable) -> list[Path]:
    """The queries in order, each file once (the same file given twice would write the same outputs)."""
    seen, out = set(), []
    for q in map(Path, queries):
        if _key(q) not in seen:
            seen.add(_key(q))
            out.append(q)
    return out


def output_names(queries: list[Path]) -> list[str]:
    """One output name (no extension) per query: its stem, or stem_ext where two queries share a stem
    (x.jpg and x.png -> x_jpg, x_png), so neither mask overwrites the other."""
    stems: dict[str, int] = {}
    for q in queries:
        stems[q.stem] = stems.get(q.stem, 0) + 1
    return [q.stem if stems[q.stem] == 1 else f"{q.stem}_{q.suffix[1:].lower()}" for q in queries]


def _is_folder(flag: str, value: str, suffix: str, n: int) -> bool:
    """Folder mode: several queries, an existing folder, or a path ending in '/'."""
    p = Path(value)
    if str(value).endswith(("/", os.sep)) or p.is_dir():
        return True
    if n == 1:
        return False
    if p.exists():
        raise ConfigError(f"{flag} {value}: {n} queries write one {suffix} file each, so {flag} must be a folder, "
                          f"but {value} is a file")
    if p.suffix.lower() in IMAGE_SUFFIXES | {".npy"}:
        raise ConfigError(f"{flag} {value}: with {n} queries {flag} is a folder (one {suffix} per query); give a "
                          "folder path, not a file name")
    return True


def _paths_for(kind: str, value, queries: list[Path], names: list[str]) -> list[Path]:
    flag, suffix, accepted, what = OUTPUT_KINDS[kind]
    if _is_folder(flag, str(value), suffix, len(queries)):
        return [Path(value) / f"{name}{suffix}" for name in names]
    if Path(value).suffix.lower() not in accepted:
        raise ConfigError(f"{flag} {value}: the {what} file needs one of the extensions {', '.join(sorted(accepted))} "
                          f"(e.g. {Path(value).with_suffix(suffix).name}), or give a folder (ending in /) to write "
                          f"<query name>{suffix} into")
    return [Path(value)]


def _check_inputs_kept(flag: str, value, paths: list[Path], queries: list[Path], inputs: dict[str, Path]) -> None:
    for q, path in zip(queries, paths):
        same = inputs.get(_key(path))
        if same is None and path.exists():
            same = next((p for p in inputs.values() if p.exists() and os.path.samefile(p, path)), None)
        if same is not None:
            raise InputError(f"{flag} {value}: the result for {q} would be written to {path}, overwriting the input "
                             f"{same}; choose another {flag} (outputs never replace inputs)")


def _check_no_collisions(planned: dict[str, tuple[str, list[Path]]], queries: list[Path]) -> None:
    owner: dict[str, tuple[str, Path]] = {}
    for flag, (_, paths) in planned.items():
        for q, path in zip(queries, paths):
            key = _key(path)
            if key in owner:
                other_flag, other_q = owner[key]
                raise InputError(f"{other_flag} and {flag} would both write {path} (for {other_q} and {q}); give "
                                 "them different folders or file names, or rename one of the queries")
            if path.is_dir():
                raise ConfigError(f"{flag}: {path} is a folder, so the result for {q} cannot be written there; "
                                  "remove it or choose another path")
            owner[key] = (flag, q)


def plan_outputs(queries: Iterable, out, logits=None, overlay=None, inputs: Iterable = ()) -> list[OutputPlan]:
    """Every query's output paths, checked before any model is built.

    queries: the query image files (after folder expansion; a file given twice is planned once).
    out / logits / overlay: the flags' values (logits, overlay: None when not asked for). With one query each
      is a file (`--out` a lossless image: .png/.bmp/.tif; `--logits` .npy; `--overlay` any image type),
      unless it names an existing folder or ends in '/'; with several queries each is a folder holding
      <query stem>.png / .npy (stem_ext when two queries share a stem).
    inputs: the other input files (support images, support masks): no output may be one of them.

    Raises InputError when an output would overwrite an input or another output, and ConfigError when a flag
    has the wrong form (file vs folder, extension) or an output folder cannot be created or written.
    """
    queries = _unique_queries(queries)
    if not queries:
        raise InputError("no query images given: pass --query with image files or folders of images")
    if out is None:
        raise ConfigError("--out is needed: a mask file (one query) or a folder (several queries)")
    names = output_names(queries)
    protected = {_key(p): p for p in [*queries, *map(Path, inputs)]}
    planned: dict[str, tuple[str, list[Path]]] = {}
    for kind, value in (("mask", out), ("logits", logits), ("overlay", overlay)):
        if value is None:
            continue
        flag = OUTPUT_KINDS[kind][0]
        if not str(value).strip():
            raise ConfigError(f"{flag} is empty; give a file name or a folder (ending in /)")
        paths = _paths_for(kind, value, queries, names)
        _check_inputs_kept(flag, value, paths, queries, protected)
        planned[flag] = (str(value), paths)
    _check_no_collisions(planned, queries)
    for flag, (value, paths) in planned.items():
        for folder in sorted({p.parent for p in paths}):
            check_writable_folder(folder, f"{flag} {value}")
    by_flag = {flag: paths for flag, (_, paths) in planned.items()}
    return [OutputPlan(q, by_flag["--out"][i], by_flag["--logits"][i] if "--logits" in by_flag else None,
                       by_flag["--overlay"][i] if "--overlay" in by_flag else None) for i, q in enumerate(queries)]
