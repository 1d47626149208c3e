"""Episodes from image files: load, check, resize, segment, and write the results."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InputError
from .imageio import image_to_tensor, logits_to_original, mask_to_tensor, read_image, read_mask


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


def load_supports(images: list, masks: list, size: int) -> SupportSet:
    """Read K support images and their masks; each mask must match its image's size."""
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
