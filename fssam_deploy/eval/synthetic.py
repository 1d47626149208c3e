"""A small synthetic dataset in the PASCAL VOC 2012 layout, for tests and quick runs of `fssam eval`.

`make_voc_dataset(root)` writes `JPEGImages/*.jpg`, `SegmentationClassAug/*.png` (8-bit class indices,
255 on object borders as in VOC) and `ImageSets/Segmentation/val.txt`. Each image holds one to three
shapes (rectangles and discs) of PASCAL classes 1..20, fold 0's classes (1..5) most often, some big
(>= 2 x 32 x 32 pixels, so they count as present by the reference's list rule) and some small (they do
not count for the lists, but a query may still be asked to segment them). Everything is drawn from one
`numpy.random.default_rng(seed)`: the same seed writes the same labels (PNG is lossless; the JPEG bytes
may differ across Pillow versions, which no episode list depends on).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FOLD0 = (1, 2, 3, 4, 5)
OTHERS = tuple(range(6, 21))


def _shape(rng: np.random.Generator, h: int, w: int, big: bool) -> np.ndarray:
    """A filled rectangle or disc, (H, W) bool; big ones cover >= 2048 pixels."""
    yy, xx = np.mgrid[0:h, 0:w]
    if big:
        side = int(rng.integers(48, min(h, w) + 1))
        ph, pw = side, int(rng.integers(side - 4, side + 1))
    else:
        ph, pw = int(rng.integers(8, 24)), int(rng.integers(8, 24))
    y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    if rng.random() < 0.5:
        return (yy >= y0) & (yy < y0 + ph) & (xx >= x0) & (xx < x0 + pw)
    cy, cx, r = y0 + ph / 2, x0 + pw / 2, min(ph, pw) / 2 * 1.15
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (yy >= y0) & (yy < y0 + ph) & (xx >= x0) & (xx < x0 + pw)


def _border(m: np.ndarray) -> np.ndarray:
    """The 1-pixel ring just outside mask m (where VOC puts its 255 'void' label)."""
    grown = m.copy()
    grown[1:] |= m[:-1]
    grown[:-1] |= m[1:]
    grown[:, 1:] |= m[:, :-1]
    grown[:, :-1] |= m[:, 1:]
    return grown & ~m


def synthetic_label(rng: np.random.Generator, h: int, w: int, index: int = 0) -> np.ndarray:
    """(H, W) uint8 label: 0 background, class indices 1..20, 255 on the objects' borders. The first (big)
    shape of image `index` cycles through fold 0's classes (every fourth image: another class), so each
    fold-0 class is present in several images."""
    label = np.zeros((h, w), np.uint8)
    n = int(rng.integers(1, 4))
    for i in range(n):
        if i == 0:
            cls = FOLD0[index % len(FOLD0)] if index % 4 != 3 else int(rng.choice(OTHERS))
        else:
            cls = int(rng.choice(FOLD0)) if rng.random() < 0.6 else int(rng.choice(OTHERS))
        m = _shape(rng, h, w, big=(i == 0) or rng.random() < 0.3)
        label[_border(m) & (label == 0)] = 255
        label[m] = cls
    return label


def synthetic_photo(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: a smooth background with each class painted in its own colour, plus noise."""
    h, w = label.shape
    low = rng.uniform(40, 200, size=(4, 4, 3))
    yy = np.linspace(0, 3, h)[:, None].repeat(w, 1)
    xx = np.linspace(0, 3, w)[None, :].repeat(h, 0)
    y0, x0 = np.minimum(yy.astype(int), 2), np.minimum(xx.astype(int), 2)
    fy, fx = (yy - y0)[..., None], (xx - x0)[..., None]
    img = (low[y0, x0] * (1 - fy) * (1 - fx) + low[y0 + 1, x0] * fy * (1 - fx)
           + low[y0, x0 + 1] * (1 - fy) * fx + low[y0 + 1, x0 + 1] * fy * fx)
    palette = np.random.default_rng(1234).uniform(0, 255, size=(256, 3))
    obj = (label > 0) & (label < 255)
    img[obj] = palette[label[obj]]
    img += rng.normal(0, 8, size=img.shape)
    return img.clip(0, 255).astype(np.uint8)


def make_voc_dataset(root: str | Path, n_images: int = 48, seed: int = 0, min_side: int = 64,
                     max_side: int = 96) -> Path:
    """Write the dataset under `root` (VOC2012 layout) and return `root`."""
    from PIL import Image

    root = Path(root)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n_images):
        h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        label = synthetic_label(rng, h, w, i)
        name = f"2007_{i:06d}"
        Image.fromarray(synthetic_photo(rng, label)).save(root / "JPEGImages" / f"{name}.jpg", quality=92)
        Image.fromarray(label).save(root / "SegmentationClassAug" / f"{name}.png")
        names.append(name)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{n}\n" for n in names))
    return root
