"""`fssam demo`: the whole story on a synthetic episode, with no arguments.

1. build the architecture (random weights: no checkpoint can be downloaded), segment one episode
   with the PyTorch pipeline, write the inputs, mask, overlay and logits;
2. export every stage to ONNX (the graphs and their manifest land in OUT/onnx);
3. run the same episode on every backend available here (PyTorch eager, ONNX Runtime, and on a
   GPU the bf16 / fused-kernel / compiled PyTorch paths and TensorRT when installed), and print the
   parity and speed table; the table, JSON and plot go to OUT/bench.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

from fssam_deploy.backends import registry
from fssam_deploy.imageio import image_to_tensor, mask_to_tensor, write_mask, write_overlay
from fssam_deploy.model import FSSAMConfig, Pipeline
from fssam_deploy.synthetic import synthetic_episode

DEMO_MARKER = "fssam-demo.json"


def available_backends(device: str) -> list[str]:
    """The demo's backends for `device`: the registry's demo backends of that device type that are installed."""
    return registry.names(device, available_only=True, demo=True)


def segment_once(cfg: FSSAMConfig, seed: int, out_dir: Path, device: str) -> None:
    """Step 1: one episode through the PyTorch pipeline, inputs and outputs written to out_dir."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = Pipeline.from_config(cfg, seed=seed, device=device)
    print(f"  built SAM 2 + DINOv2 with random weights in {time.perf_counter() - t0:.1f} s")
    query, query_gt, sup_imgs, sup_masks = synthetic_episode(cfg.image_size, cfg.shots, seed)
    s = cfg.image_size
    q = image_to_tensor(query, s)[None].to(device)
    sx = torch.stack([image_to_tensor(i, s) for i in sup_imgs])[None].to(device)
    sy = torch.stack([mask_to_tensor(m, s) for m in sup_masks])[None].to(device)
    t0 = time.perf_counter()
    logits = pipe.segment(q, sx, sy).cpu()
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
          f"{tuple(logits.shape)} in {dt:.2f} s on {device}")
    print(f"  logits range [{logits.min().item():.3f}, {logits.max().item():.3f}], "
          f"foreground {mask.mean() * 100:.1f}%, IoU vs the drawn shape {inter / max(union, 1):.3f} "
          "(meaningless with random weights)")
    print(f"  wrote {out_dir}/: query.png, support_*.png, support_*_mask.png, mask.png, overlay.png, logits.npy")


def run_demo(out_dir: Path, seed: int = 0, preset: str = "tiny", backends: list[str] | None = None,
             device: str = "cpu", iters: int = 3, force: bool = False) -> int:
    from fssam_deploy.atomic import check_output_dir
    from fssam_deploy.bench.report import markdown_table
    from fssam_deploy.bench.run import BenchSettings, run_bench
    from fssam_deploy.onnx.export import export_onnx

    cfg = FSSAMConfig.from_name(preset)
    backends = backends or available_backends(device)
    check_output_dir(out_dir, force=force, is_ours=lambda d: (d / DEMO_MARKER).is_file())
    for sub in ("onnx", "bench"):
        check_output_dir(out_dir / sub, force=force)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DEMO_MARKER).write_text('{"format": "fssam-demo/1"}\n')  # marks the folder as ours for the next run
    print(f"fssam demo: config {preset!r} = {cfg.sam2_config} + {cfg.dino}, {cfg.image_size} px, "
          f"{cfg.shots}-shot, {cfg.num_refine} refinements ({cfg.refine})")
    print("WARNING: RANDOM weights (no checkpoint): this shows the machinery, not segmentation quality.")
    print("[1/3] PyTorch pipeline")
    segment_once(cfg, seed, out_dir, device)
    onnx_backends = [b for b in backends if registry.get(b).engine_format == "fssam-onnx/1"]
    engine_dir = None
    if onnx_backends:
        print("[2/3] export to ONNX (dynamic batch)")
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine_dir = export_onnx(cfg, out_dir / "onnx", seed=seed, batch="dynamic", progress=True, force=force)
        print(f"  wrote {engine_dir}/ (one graph per stage + manifest.json) in {time.perf_counter() - t0:.0f} s")
    else:
        print("[2/3] export to ONNX: skipped (no ONNX backend asked for)")
    print(f"[3/3] the same episode on {', '.join(backends)} (parity against PyTorch fp32, speed)")
    st = BenchSettings(backends=backends, batches=[1], shots=[cfg.shots], cfg=cfg, warmup=1, iters=iters,
                       device=device, seed=seed, engine_dir=str(engine_dir) if engine_dir else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_bench(st, out_dir / "bench", progress=True)
    print(markdown_table(result))
    print(f"  wrote {out_dir}/bench/: bench.json, bench.md, bench.png (speed-up and stage latency per backend)")
    worst = min(r.get("mask_iou", 1.0) for r in result["rows"])
    print(f"  every backend's mask against PyTorch fp32: IoU >= {worst:.4f}")
    return 0
