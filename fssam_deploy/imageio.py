"""Reading images and masks from files, resizing to the model, writing masks and overlays."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Any common format (RGB, RGBA, gray, palette) -> (H, W, 3) uint8 RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA").convert("RGB")
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise InputError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: cannot read image ({exc})") from None
    return arr


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """8-bit mask -> (H, W) float32 in {0, 1}: nonzero (255 too) is foreground."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except FileNotFoundError:
        raise InputError(f"{path}: mask file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: cannot read mask ({exc})") from None
    if arr.ndim == 3:
        if arr.shape[2] not in (1, 3, 4) or not (arr[..., :3] == arr[..., :1]).all():
            raise InputError(f"{path}: a mask must have one channel (gray or equal RGB channels); "
                             f"got shape {arr.shape}")
        arr = arr[..., 0]
    return (arr > 0).astype(np.float32)


def check_readable(paths) -> None:
    """Open each image header (cheap, no decoding) so a bad file fails before any model work."""
    from PIL import Image, UnidentifiedImageError

    for p in paths:
        try:
            with Image.open(p):
                pass
        except FileNotFoundError:
            raise InputError(f"{p}: image file not found") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{p}: cannot read image ({exc})") from None


def list_images(paths: list[str]) -> list[Path]:
    """Files, and the images inside folders (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"{p}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out.extend(found)
        elif not p.is_file():
            raise InputError(f"{p}: image file not found")
        else:
            out.append(p)
    return out


def image_to_tensor(img: np.ndarray, size: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, S, S) float32 in 0..255, bilinear resize."""
    t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float()[None]
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t[0]


def mask_to_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """(H, W) {0, 1} -> (S, S) float32, nearest resize (keeps it binary)."""
    t = torch.from_numpy(np.array(mask, dtype=np.float32, copy=True)).float()[None, None]
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="nearest")
    return t[0, 0]


def logits_to_original(logits: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(1, S, S) or (S, S) logits -> (H, W) logits, bilinear align_corners=True (FSSAM's test)."""
    t = logits.reshape(1, 1, *logits.shape[-2:]).float()
    return F.interpolate(t, size=hw, mode="bilinear", align_corners=True)[0, 0]


def write_mask(path, mask: np.ndarray) -> None:
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((mask > 0).astype(np.uint8) * 255).save(path)


def write_overlay(path, img: np.ndarray, mask: np.ndarray, color=(255, 64, 32), alpha: float = 0.5) -> None:
    """The image with the mask tinted in `color`."""
    from PIL import Image

    out = img.astype(np.float32).copy()
    m = mask > 0
    out[m] = out[m] * (1 - alpha) + np.asarray(color, np.float32) * alpha
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(out.clip(0, 255).astype(np.uint8)).save(path)
