"""Request decoding for the served models: encoded images (PNG/JPEG bytes) or raw uint8 arrays, checked.

Every input of a request is checked before any model work, and each problem is an InputError that names
the model input and says what to send instead: both or neither of an encoded / raw pair, bytes that do not
decode, wrong rank or channel count, a mask whose size differs from its support's, support/mask count
mismatch, too many supports, payloads over `Limits`. Decoding is `imageio.read_image` / `read_mask` (EXIF
orientation, 16-bit scaling, pixel limit, soft-mask thresholding) on the request's bytes, and resizing is
`imageio.image_to_tensor` / `mask_to_tensor`: what `fssam run` does to files.

Inputs carry Triton's batch axis first; a support set is one per request (batch 1), queries may be several
of one size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from fssam_deploy.errors import InputError
from fssam_deploy.imageio import (
    binarize_mask,
    image_to_tensor,
    logits_to_original,
    mask_to_tensor,
    read_image,
    read_mask,
)


@dataclass(frozen=True)
class Limits:
    """What one request may carry: `max_request_bytes` of input data in all, images of at most `max_pixels`
    each, at most `max_supports` support images and `max_queries` queries."""

    max_request_bytes: int = 64 << 20
    max_pixels: int = 40_000_000
    max_supports: int = 16
    max_queries: int = 16


class NamedBytes(io.BytesIO):
    """Request bytes that Pillow opens like a file and errors name like one ("query[0] of fssam_segment")."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.label = name

    def __str__(self) -> str:
        return self.label

    __repr__ = __str__


def request_nbytes(req) -> int:
    """Bytes of input data a request carries (arrays and the BYTES elements inside them)."""
    n = 0
    for arr in req.values():
        arr = np.asarray(arr)
        n += sum(len(x) for x in arr.ravel()) if arr.dtype == object else arr.nbytes
    return n


def check_size(req, model: str, limits: Limits) -> None:
    n = request_nbytes(req)
    if n > limits.max_request_bytes:
        raise InputError(f"{model}: request carries {n / 2**20:.1f} MiB of input data, over the server's limit of "
                         f"{limits.max_request_bytes / 2**20:.1f} MiB (--max-request-mb); send smaller images")


def _pick(req, model: str, encoded: str, raw: str):
    has_enc, has_raw = encoded in req.keys(), raw in req.keys()
    if has_enc == has_raw:
        how = "both" if has_enc else "neither"
        raise InputError(f"{model}: got {how} of {encoded!r} (encoded PNG/JPEG bytes) and {raw!r} (raw uint8 "
                         "array); send exactly one of them")
    return (encoded, np.asarray(req[encoded]), True) if has_enc else (raw, np.asarray(req[raw]), False)


def _check_raw(arr: np.ndarray, name: str, model: str, rank: int, layout: str, limits: Limits) -> None:
    if arr.dtype != np.uint8:
        raise InputError(f"{model}: input {name!r} has dtype {arr.dtype}, expected uint8 (0..255)")
    if arr.ndim != rank:
        raise InputError(f"{model}: input {name!r} has shape {tuple(arr.shape)} (rank {arr.ndim}), expected rank "
                         f"{rank}: {layout}")
    if layout.endswith("3)") and arr.shape[-1] != 3:
        raise InputError(f"{model}: input {name!r} has {arr.shape[-1]} channels (shape {tuple(arr.shape)}), expected "
                         f"3 (RGB): {layout}")
    hw = arr.shape[-3:-1] if layout.endswith("3)") else arr.shape[-2:]
    if min(hw) == 0:
        raise InputError(f"{model}: input {name!r} has an empty image (shape {tuple(arr.shape)})")
    if hw[0] * hw[1] > limits.max_pixels:
        raise InputError(f"{model}: input {name!r} images of {hw[1]}x{hw[0]} are over the limit of "
                         f"{limits.max_pixels / 1e6:g} MPixel; downscale them")


def _bytes_items(arr: np.ndarray, name: str, model: str) -> list[bytes]:
    if arr.dtype != object:
        raise InputError(f"{model}: input {name!r} has dtype {arr.dtype}, expected BYTES (encoded PNG/JPEG files)")
    items = [x if isinstance(x, bytes) else bytes(x) for x in arr.ravel()]
    for i, x in enumerate(items):
        if not x:
            raise InputError(f"{model}: input {name!r}[{i}] is empty; send the bytes of a PNG or JPEG file")
    return items


def decode_queries(req, model: str, limits: Limits) -> list[np.ndarray]:
    """The request's query image(s) -> list of (H, W, 3) uint8 (one request may carry several of one size)."""
    name, arr, encoded = _pick(req, model, "query", "query_raw")
    if encoded:
        items = _bytes_items(arr, name, model)
        imgs = [read_image(NamedBytes(x, f"{model} input {name!r}[{i}]"), max_pixels=limits.max_pixels)
                for i, x in enumerate(items)]
    else:
        _check_raw(arr, name, model, 4, "(batch, H, W, 3)", limits)
        imgs = list(arr)
    if len(imgs) > limits.max_queries:
        raise InputError(f"{model}: {len(imgs)} queries in one request, over the limit of {limits.max_queries}")
    if len({im.shape for im in imgs}) > 1:
        raise InputError(f"{model}: the queries of one request have different sizes "
                         f"({sorted({im.shape[:2] for im in imgs})}); send one query per request")
    return imgs


def decode_supports(req, model: str, limits: Limits) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The request's support set -> K images (H, W, 3) uint8 and K masks (H, W) {0, 1} float32, checked."""
    iname, iarr, ienc = _pick(req, model, "supports", "supports_raw")
    mname, marr, menc = _pick(req, model, "support_masks", "support_masks_raw")
    if iarr.shape[:1] != (1,) or marr.shape[:1] != (1,):
        raise InputError(f"{model}: one support set per request (batch 1); got {iname!r} of shape "
                         f"{tuple(iarr.shape)} and {mname!r} of shape {tuple(marr.shape)}")
    if ienc:
        items = _bytes_items(iarr, iname, model)
        imgs = [read_image(NamedBytes(x, f"{model} input {iname!r}[{i}]"), max_pixels=limits.max_pixels)
                for i, x in enumerate(items)]
    else:
        _check_raw(iarr, iname, model, 5, "(1, K, H, W, 3)", limits)
        imgs = list(iarr[0])
    if menc:
        items = _bytes_items(marr, mname, model)
        masks = [read_mask(NamedBytes(x, f"{model} input {mname!r}[{i}]"), max_pixels=limits.max_pixels)
                 for i, x in enumerate(items)]
    else:
        _check_raw(marr, mname, model, 4, "(1, K, H, W) with 0 = background, nonzero = object", limits)
        masks = [binarize_mask(m, 255.0, f"{model} input {mname!r}[{i}]") for i, m in enumerate(marr[0])]
    if not imgs:
        raise InputError(f"{model}: input {iname!r} holds no support image; send at least one")
    if len(imgs) != len(masks):
        raise InputError(f"{model}: {len(imgs)} support image(s) in {iname!r} but {len(masks)} mask(s) in "
                         f"{mname!r}; send one mask per support, in the same order")
    if len(imgs) > limits.max_supports:
        raise InputError(f"{model}: {len(imgs)} supports in one request, over the limit of {limits.max_supports}")
    for i, (img, m) in enumerate(zip(imgs, masks)):
        if img.shape[:2] != m.shape:
            raise InputError(f"{model}: {mname!r}[{i}] is {m.shape[1]}x{m.shape[0]} (WxH) but its support "
                             f"{iname!r}[{i}] is {img.shape[1]}x{img.shape[0]}; a mask must have its image's size")
    return imgs, masks


def decode_support_id(req, model: str) -> str:
    """The request's `support_id` string (one per request)."""
    if "support_id" not in req.keys():
        raise InputError(f"{model}: input 'support_id' is missing; send the id fssam_register returned")
    arr = np.asarray(req["support_id"])
    items = _bytes_items(arr, "support_id", model)
    if len(items) != 1:
        raise InputError(f"{model}: input 'support_id' holds {len(items)} ids; send one per request")
    try:
        return items[0].decode("ascii").strip()
    except UnicodeDecodeError:
        raise InputError(f"{model}: input 'support_id' is not ASCII text; send the id fssam_register "
                         "returned") from None


def supports_to_tensors(imgs: list[np.ndarray], masks: list[np.ndarray], size: int):
    """K images and masks -> supports (1, K, 3, S, S) 0..255 and masks (1, K, S, S) {0, 1}."""
    return (torch.stack([image_to_tensor(i, size) for i in imgs])[None],
            torch.stack([mask_to_tensor(m, size) for m in masks])[None])


def queries_to_tensor(imgs: list[np.ndarray], size: int) -> torch.Tensor:
    """Query images -> (B, 3, S, S) 0..255."""
    return torch.stack([image_to_tensor(i, size) for i in imgs])


def to_original(logits: torch.Tensor, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(1, S, S) logits -> mask (H, W) uint8 {0, 1} and logits (H, W) float32 at the query's size, as `fssam run`."""
    full = logits_to_original(logits.cpu(), hw)
    return (torch.sigmoid(full) >= 0.5).numpy().astype(np.uint8), full.numpy().astype(np.float32)
