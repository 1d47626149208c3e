"""PASCAL-5i and COCO-20i as the FSSAM reference reads them: layouts, fold classes, list files.

Layouts (`--data-root`): PASCAL is VOC2012 (`JPEGImages/*.jpg`, `SegmentationClassAug/*.png`); COCO is
MSCOCO2014 (`train2014/`, `val2014/`, `annotations/{train2014,val2014}/*.png`, one 8-bit class-index PNG
per image). Labels hold class indices, 0 background, 255 ignore.

The test lists (`FSSList`): `items`, the queries in list order, and `class_files`, per fold class the
(image, label) pairs a support is drawn from. Read from the reference's `fss_list/val/data_list_{k}.txt`
(one "image label" pair a line) and `sub_class_file_list_{k}.txt` (a Python dict literal), or built from
a base list ("image label" lines, e.g. the reference's `lists/pascal/val.txt`) by the rule of the
reference's `make_dataset`: a fold class is present in an image when it covers >= 2 x 32 x 32 pixels;
an image with a present class is a query, and a support candidate for each present class. Paths are kept
relative to the data root, so lists written for `../data/VOCdevkit2012/VOC2012` work with any root.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fssam_deploy.errors import ConfigError, InputError

DATASETS = ("pascal", "coco")
MIN_PIXELS = 2 * 32 * 32  # make_dataset: a class counts when its mask, downsampled 32x, keeps > 2 pixels
IGNORE = 255
# the first path component of each layout's files: what a list path is made relative to
ANCHORS = {"pascal": ("JPEGImages", "SegmentationClassAug"),
           "coco": ("train2014", "val2014", "annotations")}

Pair = tuple[str, str]  # (image, label), relative to the data root, '/'-separated


def fold_classes(dataset: str, fold: int) -> list[int]:
    """The fold's test classes, in the reference's order (its `sub_val_list`).

    PASCAL fold i: 5i+1 .. 5i+5. COCO fold i: i+1, i+5, ..., (the interleaved split, `use_split_coco: True`
    in every COCO yaml of the reference).
    """
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset {dataset!r}: choose from {', '.join(DATASETS)}")
    if fold not in (0, 1, 2, 3):
        raise ConfigError(f"--fold {fold}: folds are 0, 1, 2, 3")
    if dataset == "pascal":
        return list(range(5 * fold + 1, 5 * fold + 6))
    return list(range(fold + 1, 81, 4))


def relative(path: str, dataset: str) -> str:
    """A list path relative to the data root: from its first layout folder on (`JPEGImages/...`)."""
    parts = path.strip().replace("\\", "/").split("/")
    for i, p in enumerate(parts):
        if p in ANCHORS[dataset]:
            return "/".join(parts[i:])
    return "/".join(p for p in parts if p not in ("", "."))


def read_label(path: str | os.PathLike) -> np.ndarray:
    """An 8-bit class-index PNG -> (H, W) uint8 (gray or palette: the stored indices)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = im.mode
            arr = np.asarray(im)
    except FileNotFoundError:
        raise InputError(f"{path}: label file not found (check --data-root and the list files)") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: cannot read label ({exc})") from None
    if mode not in ("L", "P") or arr.ndim != 2:
        raise InputError(f"{path}: a label must be an 8-bit one-channel class-index PNG (gray or palette), "
                         f"got mode {mode} with shape {arr.shape} (use SegmentationClassAug / the COCO PNG masks)")
    return arr


def present_classes(label: np.ndarray, classes, min_pixels: int = 0) -> list[int]:
    """The classes of `classes` in `label` (ascending), each covering at least `min_pixels` pixels."""
    counts = np.bincount(label.ravel(), minlength=256)
    wanted = set(classes)
    return [c for c in range(1, IGNORE) if c in wanted and counts[c] > 0 and counts[c] >= min_pixels]


@dataclass
class FSSList:
    """The test lists of one dataset fold (paths relative to `data_root`)."""

    dataset: str
    fold: int
    data_root: Path
    classes: list[int]
    items: list[Pair]
    class_files: dict[int, list[Pair]]
    source: str = ""
    present: dict[Pair, list[int]] = field(default_factory=dict, repr=False)  # cache: query -> classes

    def path(self, rel: str) -> Path:
        return self.data_root / rel

    def query_classes(self, item: Pair) -> list[int]:
        """The fold classes present in a query's label (any pixel count, as `SemData.__getitem__`)."""
        if item not in self.present:
            self.present[item] = present_classes(read_label(self.path(item[1])), self.classes)
        return self.present[item]


def _read_pairs(path: Path, dataset: str) -> list[Pair]:
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise InputError(f"{path}:{n}: expected 'image label' (two paths), got {line!r}")
        pairs.append((relative(parts[0], dataset), relative(parts[1], dataset)))
    return pairs


def read_class_files(path: Path, dataset: str) -> dict[int, list[Pair]]:
    """`sub_class_file_list_{k}.txt`: a dict literal {class: [(image, label), ...]}."""
    try:
        raw = ast.literal_eval(path.read_text())
        return {int(c): [(relative(i, dataset), relative(m, dataset)) for i, m in v] for c, v in raw.items()}
    except (ValueError, SyntaxError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: not a {{class: [(image, label), ...]}} dict literal ({exc})") from None


def build_lists(pairs: list[Pair], data_root: Path, classes: list[int]) -> tuple[list[Pair], dict[int, list[Pair]]]:
    """make_dataset's rule over a base list: queries and per-class support candidates, in list order."""
    items: list[Pair] = []
    class_files: dict[int, list[Pair]] = {c: [] for c in classes}
    for pair in pairs:
        present = present_classes(read_label(data_root / pair[1]), classes, MIN_PIXELS)
        if present:
            items.append(pair)
            for c in present:
                class_files[c].append(pair)
    return items, class_files


def default_base_list(dataset: str, data_root: Path) -> tuple[list[Pair], str]:
    """The val images when no --lists is given: VOC's ImageSets/Segmentation/val.txt; for COCO the sorted
    annotations/val2014/*.png (the reference's own lists/coco/val.txt has another order: pass --lists)."""
    if dataset == "pascal":
        names = data_root / "ImageSets" / "Segmentation" / "val.txt"
        if not names.is_file():
            raise InputError(f"{names}: not found; give --lists with the reference's lists/pascal folder (val.txt "
                             "or fss_list/val/*) or use the VOC2012 layout with ImageSets/Segmentation/val.txt")
        return [(f"JPEGImages/{n}.jpg", f"SegmentationClassAug/{n}.png") for n in names.read_text().split()], str(names)
    ann = data_root / "annotations" / "val2014"
    if not ann.is_dir():
        raise InputError(f"{ann}: not found; --data-root must be the MSCOCO2014 folder (val2014/, annotations/)")
    return [(f"val2014/{p.stem}.jpg", f"annotations/val2014/{p.name}") for p in sorted(ann.glob("*.png"))], str(ann)


def open_lists(dataset: str, data_root: str | os.PathLike, fold: int,
               lists: str | os.PathLike | None = None) -> FSSList:
    """The fold's lists: `lists` holds the reference's `fss_list/val/` files (or them directly), else a base
    `val.txt` to build from; without `lists` the base list comes from the layout (`default_base_list`)."""
    classes = fold_classes(dataset, fold)
    root = Path(data_root)
    if not root.is_dir():
        raise InputError(f"--data-root {root}: not a folder")
    if lists is not None:
        d = Path(lists)
        for folder in (d / "fss_list" / "val", d):
            dl, sc = folder / f"data_list_{fold}.txt", folder / f"sub_class_file_list_{fold}.txt"
            if dl.is_file() and sc.is_file():
                items, class_files = _read_pairs(dl, dataset), read_class_files(sc, dataset)
                missing = [c for c in classes if c not in class_files]
                if missing:
                    raise InputError(f"{sc}: no entry for fold {fold} classes {missing} (a list of another fold?)")
                return FSSList(dataset, fold, root, classes, items, class_files, source=str(dl))
        base = d / "val.txt"
        if not base.is_file():
            raise InputError(f"--lists {d}: holds neither fss_list/val/data_list_{fold}.txt + "
                             f"sub_class_file_list_{fold}.txt nor a base val.txt")
        pairs, source = _read_pairs(base, dataset), str(base)
    else:
        pairs, source = default_base_list(dataset, root)
    items, class_files = build_lists(pairs, root, classes)
    if not items:
        raise InputError(f"{source}: no image has a fold-{fold} class ({classes}) covering >= {MIN_PIXELS} pixels")
    return FSSList(dataset, fold, root, classes, items, class_files, source=f"built from {source}")


def write_lists(fss: FSSList, folder: str | os.PathLike) -> Path:
    """The lists in the reference's format (`data_list_{k}.txt`, `sub_class_file_list_{k}.txt`), for --lists."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"data_list_{fss.fold}.txt").write_text("".join(f"{i} {m}\n" for i, m in fss.items))
    (folder / f"sub_class_file_list_{fss.fold}.txt").write_text(str(fss.class_files))
    return folder
