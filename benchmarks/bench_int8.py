"""int8 vs fp32 on ONNX Runtime (CPU): per-stage and episode latency, and what int8 costs in mask IoU.

Exports the fp32 graphs, quantizes the big encoders (`fssam_deploy.onnx.quantize`) with each
method asked for, then in one process, interleaved (fp32, int8, fp32, int8, ...), runs the same
synthetic episode through every engine dir: median / p90 latency of the episode and of each stage,
and the mask IoU and max logit error of int8 against fp32 ORT over `--episodes` episodes.
On a shared machine wall times swing with the neighbours' load: the table also gives the fastest
run and the process CPU time (every ONNX Runtime thread, no spinning), which other processes
disturb less (a busy host still inflates it), and the speedup by each of the three.

usage:
  python benchmarks/bench_int8.py --preset tiny --weights random,stressed --methods dynamic,static \
      --iters 5 --out int8.json

Weights (`--weights`; no trained weights ship with this project, so the first two are random):
  random    the architectures' own init. timm initialises DINOv2's LayerScale to 1e-5, so its random
            blocks barely touch the residual stream and hide their quantization error; random SAM 2
            logits span about +-0.5, so a tiny error flips pixels near 0.
  stressed  the same, with every DINOv2 LayerScale set to `--layer-scale` (1.0) so every block counts,
            and the mask decoder's last hypernetwork layers scaled by `--logit-gain` (30, as
            benchmarks/reference_parity.py) so masks have edges. Closer to how a trained model
            propagates quantization error; still not a trained model's weight and activation ranges.
  checkpoint  `--checkpoint PATH` (an FSSAM checkpoint of the preset's architecture): the real figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch

from fssam_deploy.backends.onnxruntime import onnx_episode
from fssam_deploy.bench.timing import Stats
from fssam_deploy.model import FSSAMConfig, random_weights, save_fssam_checkpoint
from fssam_deploy.onnx.export import export_onnx
from fssam_deploy.onnx.quantize import METHODS, quantize_engine_dir
from fssam_deploy.parity import parity
from fssam_deploy.synthetic import episode_tensors

WEIGHTS = ("random", "stressed", "checkpoint")


def stressed_checkpoint(cfg: FSSAMConfig, seed: int, layer_scale: float, logit_gain: float, path: Path) -> Path:
    weights = random_weights(cfg, seed)
    with torch.no_grad():
        for block in weights.dino.blocks:
            block.ls1.gamma.fill_(layer_scale)
            block.ls2.gamma.fill_(layer_scale)
        for mlp in weights.sam2.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(logit_gain)
    save_fssam_checkpoint(weights, path)
    return path


def build_engines(args, cfg: FSSAMConfig, kind: str, work: Path) -> dict[str, Path]:
    """{"fp32": dir, "int8-<method>": dir, ...} and the seconds each took, in args.timings."""
    ckpt = args.checkpoint if kind == "checkpoint" else None
    if kind == "stressed":
        ckpt = stressed_checkpoint(cfg, args.seed, args.layer_scale, args.logit_gain, work / f"{kind}.pth")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dirs = {"fp32": export_onnx(cfg, work / f"{kind}-fp32", checkpoint=ckpt, seed=args.seed, progress=False)}
    args.timings[f"{kind}/export_s"] = time.perf_counter() - t0
    for method in args.methods:
        t0 = time.perf_counter()
        dirs[f"int8-{method}"] = quantize_engine_dir(dirs["fp32"], work / f"{kind}-int8-{method}", method=method,
                                                     seed=args.seed + 1000)  # calibration != measured episodes
        args.timings[f"{kind}/quantize_{method}_s"] = time.perf_counter() - t0
    return dirs


def measure(args, cfg: FSSAMConfig, dirs: dict[str, Path]) -> dict:
    """Interleaved latency on one episode, then parity with fp32 over `args.episodes` episodes."""
    episodes = {name: onnx_episode(d, expect=cfg, threads=args.threads) for name, d in dirs.items()}
    q, sx, sy = episode_tensors(cfg, 1, cfg.shots, args.seed)
    total, cpu = {name: Stats() for name in episodes}, {name: Stats() for name in episodes}
    stages = {name: {} for name in episodes}
    for it in range(args.warmup + args.iters):
        for name, ep in episodes.items():
            with ep.timing() as times:
                t0, c0 = time.perf_counter(), time.process_time()
                ep.segment(q, sx, sy)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if it >= args.warmup:
                total[name].add(dt)
                cpu[name].add(dc)
                for stage, s in times.items():
                    stages[name].setdefault(stage, Stats()).add(s)
    rows = {}
    for name, ep in episodes.items():
        rows[name] = {"episode": total[name].to_dict(), "episode_cpu": cpu[name].to_dict(),
                      "stages": {k: v.to_dict() for k, v in stages[name].items()},
                      "quantized_stages": [k for k, v in ep.manifest["stages"].items() if "quantized" in v]}
    for i in range(args.episodes):
        q, sx, sy = episode_tensors(cfg, 1, cfg.shots, args.seed + i)
        ref = episodes["fp32"].segment(q, sx, sy)
        for name, ep in episodes.items():
            p = parity(ep.segment(q, sx, sy), ref)
            rows[name].setdefault("parity", []).append({**p, "logit_scale": ref.abs().max().item(),
                                                        "fg_pixels_fp32": int((ref > 0).sum())})
    for row in rows.values():
        row["speedup_vs_fp32"] = rows["fp32"]["episode"]["median_ms"] / row["episode"]["median_ms"]
        row["speedup_vs_fp32_min"] = rows["fp32"]["episode"]["min_ms"] / row["episode"]["min_ms"]
        row["speedup_vs_fp32_cpu"] = rows["fp32"]["episode_cpu"]["median_ms"] / row["episode_cpu"]["median_ms"]
        row["min_mask_iou"] = min(p["mask_iou"] for p in row["parity"])
        row["max_abs_logit_err"] = max(p["max_abs_logit_err"] for p in row["parity"])
    return rows


def table(results: dict) -> str:
    stage_names = list(next(iter(next(iter(results.values())).values()))["stages"])
    head = ["weights", "engine", "episode ms (p90)", "min ms", "CPU ms", "speedup: median / min / CPU",
            *[f"{s} ms" for s in stage_names], "min mask IoU", "max logit err", "logit scale"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, rows in results.items():
        fp32 = rows["fp32"]["stages"]
        for name, r in rows.items():
            cells = [kind, name, f"{r['episode']['median_ms']:.0f} ({r['episode']['p90_ms']:.0f})",
                     f"{r['episode']['min_ms']:.0f}", f"{r['episode_cpu']['median_ms']:.0f}",
                     f"{r['speedup_vs_fp32']:.2f}x / {r['speedup_vs_fp32_min']:.2f}x / {r['speedup_vs_fp32_cpu']:.2f}x"]
            for s in stage_names:
                ms = r["stages"][s]["median_ms"]
                cells.append(f"{ms:.0f}" + (f" ({fp32[s]['median_ms'] / ms:.2f}x)" if name != "fp32" else ""))
            scale = max(p["logit_scale"] for p in r["parity"])
            cells += [f"{r['min_mask_iou']:.4f}", f"{r['max_abs_logit_err']:.2e}", f"{scale:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment(args) -> dict:
    import onnxruntime

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "load_average_at_end": os.getloadavg()}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", help="FSSAMConfig preset: tiny, paper, ...")
    ap.add_argument("--weights", default="random,stressed", help=f"comma list of {WEIGHTS}")
    ap.add_argument("--methods", default="dynamic", help=f"comma list of {METHODS}")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--episodes", type=int, default=4, help="episodes for the parity figures")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layer-scale", type=float, default=1.0, help="stressed: DINOv2 LayerScale value")
    ap.add_argument("--logit-gain", type=float, default=30.0, help="stressed: mask decoder last-layer gain")
    ap.add_argument("--checkpoint", default=None, help="weights 'checkpoint': an FSSAM checkpoint to export")
    ap.add_argument("--work-dir", default=None, help="where graphs go (default: a temporary folder)")
    ap.add_argument("--out", required=True, help="JSON results path")
    args = ap.parse_args(argv)
    args.weights, args.methods = args.weights.split(","), args.methods.split(",")
    bad = [w for w in args.weights if w not in WEIGHTS] + [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown weights/methods {bad}; weights from {WEIGHTS}, methods from {METHODS}")
    if ("checkpoint" in args.weights) != bool(args.checkpoint):
        ap.error("--weights checkpoint and --checkpoint PATH go together")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = FSSAMConfig.from_name(args.preset)
    args.timings, results = {}, {}
    with tempfile.TemporaryDirectory(prefix="fssam-int8-", dir=args.work_dir) as work:
        for kind in args.weights:
            dirs = build_engines(args, cfg, kind, Path(work))
            results[kind] = measure(args, cfg, dirs)
            int8 = [r["quantized_stages"] for name, r in results[kind].items() if name != "fp32"]
            print(f"{kind} weights: int8 stages {int8[0] if int8 else []}", flush=True)
    report = {"config": cfg.to_dict(), "preset": args.preset, "settings": {k: v for k, v in vars(args).items()
                                                                           if k not in ("timings", "out")},
              "build_seconds": args.timings, "environment": environment(args), "results": results}
    print(table(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
