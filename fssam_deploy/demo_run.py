"""`fssam demo`: a synthetic episode through the PyTorch pipeline, printed step by step."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .demo import synthetic_episode
from .imageio import image_to_tensor, mask_to_tensor, write_mask, write_overlay
from .model import FSSAMConfig, Pipeline


def run_demo(out_dir: Path, seed: int = 0, preset: str = "tiny") -> int:
    cfg = FSSAMConfig.from_name(preset)
    print(f"fssam demo: config {preset!r} = {cfg.sam2_config} + {cfg.dino}, {cfg.image_size} px, "
          f"{cfg.shots}-shot, {cfg.num_refine} refinements ({cfg.refine})")
    print("WARNING: RANDOM weights (no checkpoint): this shows the machinery, not segmentation quality.")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = Pipeline.from_config(cfg, seed=seed)
    print(f"  built SAM 2 + DINOv2 with random weights in {time.perf_counter() - t0:.1f} s")
    query, query_gt, sup_imgs, sup_masks = synthetic_episode(cfg.image_size, cfg.shots, seed)
    s = cfg.image_size
    q = image_to_tensor(query, s)[None]
    sx = torch.stack([image_to_tensor(i, s) for i in sup_imgs])[None]
    sy = torch.stack([mask_to_tensor(m, s) for m in sup_masks])[None]
    t0 = time.perf_counter()
    logits = pipe.segment(q, sx, sy)
    dt = time.perf_counter() - t0
    mask = (torch.sigmoid(logits[0, 0]) >= 0.5).numpy()
    inter, union = np.logical_and(mask, query_gt > 0).sum(), np.logical_or(mask, query_gt > 0).sum()
    out_dir.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray(query).save(out_dir / "query.png")
    for i, (img, m) in enumerate(zip(sup_imgs, sup_masks)):
        Image.fromarray(img).save(out_dir / f"support_{i}.png")
        write_mask(out_dir / f"support_{i}_mask.png", m)
    write_mask(out_dir / "mask.png", mask)
    write_overlay(out_dir / "overlay.png", query, mask)
    np.save(out_dir / "logits.npy", logits[0, 0].numpy())
    print(f"  episode: query {q.shape[-1]}x{q.shape[-2]} + {cfg.shots} support(s) -> logits "
          f"{tuple(logits.shape)} in {dt:.2f} s on the CPU")
    print(f"  logits range [{logits.min().item():.3f}, {logits.max().item():.3f}], "
          f"foreground {mask.mean() * 100:.1f}%, IoU vs the drawn shape {inter / max(union, 1):.3f} "
          "(meaningless with random weights)")
    print(f"  wrote {out_dir}/: query.png, support_*.png, support_*_mask.png, mask.png, overlay.png, logits.npy")
    return 0
