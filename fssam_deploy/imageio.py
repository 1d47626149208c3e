"""Reading images and masks as people see them, resizing to the model, writing masks, logits and overlays.

Reading: EXIF orientation is applied (query, supports and masks alike, so a mask drawn on the displayed
photo fits it); 16-bit and float images are scaled to 0..255, not clipped; images over a pixel limit
(`FSSAM_MAX_PIXELS`, 100 MPixel by default) are refused before decoding; anything Pillow raises on a bad
file becomes an InputError naming the file. Masks: binary masks ({0, v} for any v > 0, or the reference's
label form {0, 1, 255} with 255 = ignore) keep their foreground; soft (anti-aliased) masks are thresholded at
half their range (>= 128 for 8-bit) with a SoftMaskWarning naming the file.

Writing goes to a temporary sibling renamed over the target at the end: no half-written outputs.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fssam_deploy.errors import ConfigError, FSSAMError, InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
MASK_SUFFIXES = {".png", ".bmp", ".tif", ".tiff"}  # lossless: a JPEG mask would not stay binary
MAX_PIXELS_ENV = "FSSAM_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 100_000_000
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class SoftMaskWarning(UserWarning):
    """A mask with intermediate values (anti-aliased, blurred) was thresholded at half its range."""


def max_pixels(limit: int | None = None) -> int:
    """The pixel limit: `limit` if given, else $FSSAM_MAX_PIXELS, else 100 MPixel.

    Pillow's hard limit (2 x PIL.Image.MAX_IMAGE_PIXELS, 179 MPixel by default) still applies above it; this
    module never changes Pillow's global setting.
    """
    source, value = ("max_pixels", limit) if limit is not None else (MAX_PIXELS_ENV, os.environ.get(MAX_PIXELS_ENV))
    if value is None or value == "":
        return DEFAULT_MAX_PIXELS
    try:
        n = int(str(value).replace("_", ""))
    except ValueError:
        n = 0
    if n <= 0:
        raise ConfigError(f"{source}={value!r}: expected a positive whole number of pixels, e.g. {DEFAULT_MAX_PIXELS}")
    return n


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _load(path, what: str, limit: int | None, decode: bool = True):
    """The image at `path`, decoded and EXIF-transposed (None when not `decode`: header and size only)."""
    from PIL import Image, ImageOps

    limit = max_pixels(limit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            with Image.open(path) as im:
                w, h = im.size
                if w * h > limit:
                    raise InputError(f"{path}: {what} of {w}x{h} ({w * h / 1e6:.1f} MPixel) is over the limit of "
                                     f"{limit / 1e6:g} MPixel; downscale it, or raise the limit with "
                                     f"{MAX_PIXELS_ENV}=<pixels>")
                if not decode:
                    return None
                im.load()
                return ImageOps.exif_transpose(im)  # a copy, turned as viewers show it
    except FSSAMError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not an {what} file") from None
    except PermissionError:
        raise InputError(f"{path}: cannot open the {what} file (permission denied)") from None
    except Image.DecompressionBombError as exc:  # over 2 x Image.MAX_IMAGE_PIXELS: Pillow refuses before we can
        hard = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise InputError(f"{path}: {what} is over Pillow's hard limit of {hard / 1e6:.0f} MPixel ({_reason(exc)}); "
                         "downscale it") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise InputError(f"{path}: cannot read {what} ({_reason(exc)}); is it a complete JPEG/PNG/BMP/TIFF/WebP "
                         "file?") from None


def _value_range(mode: str, arr: np.ndarray) -> float:
    """The full-scale value of a high-bit image: 16-bit modes 65535; I and F inferred from their values."""
    if mode.startswith("I;16"):
        return 65535.0
    top = float(np.nanmax(arr)) if arr.size else 0.0
    for full in ((1.0,) if mode == "F" else ()) + (255.0, 65535.0):
        if top <= full:
            return full
    return top  # wider than 16 bits: scale by the image's own maximum, so nothing clips


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Any common format (RGB, RGBA, gray, palette, 16-bit, float) -> (H, W, 3) uint8 RGB, as displayed."""
    im = _load(path, "image", max_pixels)
    if im.mode in HIGH_BIT_MODES:
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
        gray = np.clip(np.rint(arr / _value_range(im.mode, arr) * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    try:
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
        return np.asarray(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - e.g. a mode Pillow cannot turn into RGB
        raise InputError(f"{path}: cannot convert the image (mode {im.mode}) to RGB ({_reason(exc)})") from None


def _mask_array(path, im) -> tuple[np.ndarray, float]:
    """(H, W) mask values and their full-scale value."""
    if im.mode == "1":
        return np.asarray(im, dtype=np.uint8), 1.0
    if im.mode in HIGH_BIT_MODES:
        arr = np.asarray(im)  # uint16 / int32 stay integers, so the threshold reads 32768, not 32767.5
        arr = np.nan_to_num(arr) if arr.dtype.kind == "f" else arr
        return arr, _value_range(im.mode, arr)
    if im.mode in ("L", "P"):
        return np.asarray(im), 255.0
    if im.mode in ("LA", "PA"):
        return np.asarray(im)[..., 0], 255.0
    try:
        arr = np.asarray(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: cannot read mask of mode {im.mode} ({_reason(exc)})") from None
    if not (arr == arr[..., :1]).all():
        raise InputError(f"{path}: a mask must have one channel (gray, or RGB with equal channels); this one has "
                         "colours. Save it as a grayscale PNG with 0 = background, 255 = object")
    return arr[..., 0], 255.0


def binarize_mask(arr: np.ndarray, full: float, name: str = "mask") -> np.ndarray:
    """Mask values -> (H, W) float32 in {0, 1}.

    Binary masks ({v} or {0, v}, v > 0) keep every nonzero pixel as foreground; {0, 1, 255} is the reference's
    label form (255 = ignore -> background). Anything else is soft: thresholded at >= full / 2 with a
    SoftMaskWarning naming `name`.
    """
    values = np.unique(arr)
    if values.size == 1 or (values.size == 2 and values[0] == 0):
        return (arr > 0).astype(np.float32)
    if full == 255.0 and values.size == 3 and values.tolist() == [0, 1, 255]:
        return (arr == 1).astype(np.float32)
    fg = arr >= full / 2
    threshold = f"{math.ceil(full / 2)}" if arr.dtype.kind in "ui" else f"{full / 2:g}"  # 128 for 8-bit
    warnings.warn(f"{name}: soft mask ({values.size} distinct values in {values[0]:g}..{values[-1]:g}) "
                  f"thresholded at >= {threshold} (half of {full:g}): {fg.mean():.1%} foreground. Save a binary "
                  "mask (0 and 255) to choose the boundary yourself", SoftMaskWarning, stacklevel=3)
    return fg.astype(np.float32)


def read_mask(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """A mask file -> (H, W) float32 in {0, 1}, as displayed (EXIF orientation applied); see binarize_mask."""
    im = _load(path, "mask", max_pixels)
    arr, full = _mask_array(path, im)
    return binarize_mask(arr, full, str(path))


def check_readable(paths, what: str = "image", decode: bool = True, max_pixels: int | None = None) -> None:
    """Open (and with `decode`, fully decode) each file so a bad or oversized one fails before any model work."""
    for p in paths:
        _load(p, what, max_pixels, decode=decode)


def list_images(paths: list[str]) -> list[Path]:
    """Files, and the images inside folders (sorted, hidden files skipped)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            try:
                found = sorted(f for f in p.iterdir()
                               if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and f.is_file())
            except OSError as exc:
                raise InputError(f"{p}: cannot list the folder ({exc.strerror or exc})") from None
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


def atomic_write(path, write: Callable[[object], None]) -> Path:
    """Call `write(file)` on a temporary sibling of `path` opened for binary writing, then rename it over `path`.

    A failure (or a kill) never leaves a half-written `path`; an OSError becomes a ConfigError naming it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.fssam-tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise ConfigError(f"{path}: cannot write ({exc.strerror or exc}); check that its folder is writable and "
                          "has space") from None
    except BaseException:
        _remove(tmp)
        raise
    return path


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _pil_format(path) -> str:
    from PIL import Image

    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None:
        raise ConfigError(f"{path}: unknown image extension {Path(path).suffix!r}; use .png")
    return fmt


def write_mask(path, mask: np.ndarray) -> Path:
    """(H, W) mask -> 8-bit 0/255 image file (format from the extension), written atomically."""
    from PIL import Image

    fmt = _pil_format(path)
    img = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
    return atomic_write(path, lambda f: img.save(f, format=fmt))


def write_logits(path, logits: np.ndarray) -> Path:
    """(H, W) float32 logits -> .npy, written atomically (no `.npy` appended to the name)."""
    arr = np.asarray(logits, dtype=np.float32)
    return atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))


def write_overlay(path, img: np.ndarray, mask: np.ndarray, color=(255, 64, 32), alpha: float = 0.5) -> Path:
    """The image with the mask tinted in `color`, written atomically."""
    from PIL import Image

    fmt = _pil_format(path)
    out = img.astype(np.float32).copy()
    m = mask > 0
    out[m] = out[m] * (1 - alpha) + np.asarray(color, np.float32) * alpha
    pic = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    return atomic_write(path, lambda f: pic.save(f, format=fmt))
