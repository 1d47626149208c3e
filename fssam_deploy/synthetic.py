"""A synthetic episode that needs no files: shapes on textured backgrounds."""

from __future__ import annotations

import numpy as np
import torch

from fssam_deploy.imageio import image_to_tensor, mask_to_tensor


def synthetic_image(rng: np.random.Generator, size: int, center, radius: float, color):
    """A smooth random background with a filled disc; -> (image (S, S, 3) uint8, mask (S, S))."""
    low = rng.uniform(40, 200, size=(8, 8, 3))
    yy, xx = np.mgrid[0:size, 0:size] / size * 7
    y0, x0 = np.floor(yy).astype(int), np.floor(xx).astype(int)
    fy, fx = (yy - y0)[..., None], (xx - x0)[..., None]
    bg = (low[y0, x0] * (1 - fy) * (1 - fx) + low[y0 + 1, x0] * fy * (1 - fx)
          + low[y0, x0 + 1] * (1 - fy) * fx + low[y0 + 1, x0 + 1] * fy * fx)
    mask = (yy * size / 7 - center[0]) ** 2 + (xx * size / 7 - center[1]) ** 2 <= radius**2
    img = bg.copy()
    img[mask] = np.asarray(color, np.float64)
    img += rng.normal(0, 6, size=img.shape)
    return img.clip(0, 255).astype(np.uint8), mask.astype(np.float32)


def synthetic_episode(size: int, shots: int = 1, seed: int = 0):
    """-> query image, its true mask, [support images], [support masks] (numpy)."""
    rng = np.random.default_rng(seed)
    color = (230, 40, 40)

    def one():
        c = rng.uniform(0.3, 0.7, 2) * size
        return synthetic_image(rng, size, c, rng.uniform(0.12, 0.22) * size, color)

    query, query_mask = one()
    pairs = [one() for _ in range(shots)]
    return query, query_mask, [p[0] for p in pairs], [p[1] for p in pairs]


def episode_tensors(cfg, batch: int = 1, shots: int | None = None, seed: int = 0):
    """B synthetic episodes as model-size tensors: query (B, 3, S, S), supports (B, K, 3, S, S), masks (B, K, S, S).

    Episode b is `synthetic_episode(S, K, seed + b)`; this is the one generator benchmarks, verify, calibration,
    the demo and the tests draw from.
    """
    k, s = shots or cfg.shots, cfg.image_size
    qs, ss, ms = [], [], []
    for b in range(batch):
        q, _, sup, masks = synthetic_episode(s, k, seed + b)
        qs.append(image_to_tensor(q, s))
        ss.append(torch.stack([image_to_tensor(x, s) for x in sup]))
        ms.append(torch.stack([mask_to_tensor(m, s) for m in masks]))
    return torch.stack(qs), torch.stack(ss), torch.stack(ms)
