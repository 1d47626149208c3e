"""Parity of fssam_deploy's PyTorch stages with the FSSAM reference code, on the CPU in fp32.

Builds the real architectures with random weights, writes an FSSAM-format checkpoint,
runs the same episodes through the reference (in a subprocess, see _reference_runner.py)
and through `fssam_deploy.Pipeline`, and reports the max abs logit difference and
whether the thresholded masks are identical.

usage:
  python benchmarks/reference_parity.py --reference-dir FSSAM_CHECKOUT --dinov2-dir DINOV2_CHECKOUT \
      [--shots 1,5] [--refine v1,v2] [--batch 2] [--out parity.json]

FSSAM_CHECKOUT is a checkout of GitHub Sam1224/FSSAM (its model/ and sam2/ folders),
DINOV2_CHECKOUT one of facebookresearch/dinov2. Neither is shipped with this project.
The reference only ships SAM 2 configs s, b+ and l at 512 px, so parity runs at those.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from fssam_deploy.model import FSSAMConfig, Pipeline, random_weights, save_fssam_checkpoint


def make_episode(cfg: FSSAMConfig, batch: int, seed: int):
    """Smooth random images (0..255) and rectangular support masks with 255 borders."""
    g = torch.Generator().manual_seed(seed)
    s, k = cfg.image_size, cfg.shots

    def smooth(n):
        low = torch.rand(n, 3, 8, 8, generator=g) * 255
        return torch.nn.functional.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)

    x = smooth(batch)
    s_x = smooth(batch * k).reshape(batch, k, 3, s, s)
    s_y = torch.zeros(batch, k, s, s)
    for b in range(batch):
        for i in range(k):
            y0, x0 = torch.randint(0, s // 2, (2,), generator=g).tolist()
            h, w = torch.randint(s // 8, s // 2, (2,), generator=g).tolist()
            s_y[b, i, y0 : y0 + h, x0 : x0 + w] = 1
            s_y[b, i, y0 + h : y0 + h + 4, x0 : x0 + w] = 255  # an ignore border
    return x, s_x, s_y


def run_case(args, cfg: FSSAMConfig, tmp: Path, seed: int) -> dict:
    weights = random_weights(cfg, seed)
    with torch.no_grad():  # random SAM 2 weights give logits near 0: widen them so masks have edges
        for mlp in weights.sam2.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(args.logit_gain)
    ckpt = tmp / f"ckpt_{seed}.pth"
    save_fssam_checkpoint(weights, ckpt, module_prefix=True)
    x, s_x, s_y = make_episode(cfg, args.batch, seed)
    spec = dict(checkpoint=str(ckpt), sam2_config=cfg.sam2_config, dino=cfg.dino, shots=cfg.shots,
                num_refine=cfg.num_refine, refine=cfg.refine, x=x, s_x=s_x, s_y=s_y)
    torch.save(spec, tmp / "in.pt")
    runner = Path(__file__).with_name("_reference_runner.py")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(runner), args.reference_dir, args.dinov2_dir,
                    str(tmp / "in.pt"), str(tmp / "out.npz")], check=True, cwd=tmp)
    t_ref = time.perf_counter() - t0
    ref = torch.from_numpy(np.load(tmp / "out.npz")["logits"])  # (B, S, S)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = Pipeline.from_config(cfg, checkpoint=ckpt)
    t0 = time.perf_counter()
    ours = pipe.segment(x, s_x, s_y)[:, 0]
    t_ours = time.perf_counter() - t0
    diff = (ours - ref).abs()
    same = torch.equal(torch.sigmoid(ours) >= 0.5, torch.sigmoid(ref) >= 0.5)
    return dict(config=cfg.to_dict(), batch=args.batch, seed=seed, max_abs_logit_diff=diff.max().item(),
                mean_abs_logit_diff=diff.mean().item(), logit_scale=ref.abs().max().item(),
                identical_masks=bool(same), mask_fraction=float((ref > 0).float().mean()),
                reference_s=t_ref, ours_s=t_ours)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-dir", required=True)
    ap.add_argument("--dinov2-dir", required=True)
    ap.add_argument("--sam2-config", default="sam2_hiera_s")
    ap.add_argument("--dino", default="dinov2_vitb14")
    ap.add_argument("--shots", default="1,5")
    ap.add_argument("--refine", default="v1,v2")
    ap.add_argument("--num-refine", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logit-gain", type=float, default=30.0,
                    help="scale of the mask decoder's last hypernetwork layers (random logits are tiny)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for shots in [int(s) for s in args.shots.split(",")]:
            for refine in args.refine.split(","):
                cfg = FSSAMConfig(sam2_config=args.sam2_config, dino=args.dino, image_size=512, shots=shots,
                                  num_refine=args.num_refine, refine=refine)
                row = run_case(args, cfg, Path(d), args.seed + shots)
                rows.append(row)
                print(f"shots={shots} refine={refine} B={args.batch}: max|dlogit|={row['max_abs_logit_diff']:.2e} "
                      f"(scale {row['logit_scale']:.1f}) identical masks={row['identical_masks']} "
                      f"fg={row['mask_fraction']:.3f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    bad = [r for r in rows if r["max_abs_logit_diff"] > 1e-3 or not r["identical_masks"]]
    print(f"{len(rows) - len(bad)} passed, {len(bad)} failed (max |dlogit| <= 1e-3 and identical masks)")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
