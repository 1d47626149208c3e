"""The `fssam` command: argparse subcommands, each one call into the library."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from .errors import FSSAMError
from .model.config import DINO_MODELS, REFINE_VERSIONS, SAM2_CONFIGS, FSSAMConfig


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--checkpoint and the config flags shared by run, export, bench, build."""
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", help="FSSAM checkpoint ({'state_dict': {'sam2.*', 'dino.*'}})")
    g.add_argument("--sam2-checkpoint", help="SAM 2 official checkpoint ({'model': ...}), with --dino-checkpoint")
    g.add_argument("--dino-checkpoint", help="DINOv2 hub-format state dict, with --sam2-checkpoint")
    g.add_argument("--sam2-config", default="sam2_hiera_s", help=f"one of {', '.join(SAM2_CONFIGS)}")
    g.add_argument("--dino", default="dinov2_vitb14", help=f"one of {', '.join(DINO_MODELS)}")
    g.add_argument("--image-size", type=int, default=512, help="model input side, a multiple of 16")
    g.add_argument("--num-refine", type=int, default=3)
    g.add_argument("--refine", default="v1", choices=REFINE_VERSIONS)
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights used without a checkpoint")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def config_from_args(args, shots: int) -> FSSAMConfig:
    return FSSAMConfig(sam2_config=args.sam2_config, dino=args.dino, image_size=args.image_size, shots=shots,
                       num_refine=args.num_refine, refine=args.refine)


def build_pipeline(args, cfg: FSSAMConfig):
    from .model import Pipeline

    if not (args.checkpoint or args.sam2_checkpoint or args.dino_checkpoint):
        print(f"WARNING: no checkpoint given: RANDOM weights (seed {args.seed}). The masks mean nothing; "
              "use this only for export and speed work.", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FSSAM is running with RANDOM weights")
        return Pipeline.from_config(cfg, args.checkpoint, args.sam2_checkpoint, args.dino_checkpoint,
                                    seed=args.seed, device=args.device)


ENGINE_SOURCES = {"onnxruntime": "fssam export", "aoti": "fssam build --format aoti",
                  "tensorrt": "fssam build --format tensorrt"}


def build_backend(args, cfg: FSSAMConfig):
    """The torch Pipeline, or an episode over exported graphs / built engines (same segment API)."""
    if args.backend == "torch":
        return build_pipeline(args, cfg)
    if not args.engine_dir:
        raise FSSAMError(f"--backend {args.backend} needs --engine-dir (written by `{ENGINE_SOURCES[args.backend]}`)")
    if args.backend == "aoti":
        from .runtime.aoti_runner import AotiEpisode

        return AotiEpisode(args.engine_dir, expect_config=cfg, device=args.device)
    if args.backend == "tensorrt":
        from .runtime.tensorrt_episode import TrtEpisode

        return TrtEpisode(args.engine_dir, expect=cfg, device=args.device)
    from .runtime.episode import OnnxEpisode

    return OnnxEpisode(args.engine_dir, expect=cfg, device=args.device)


def cmd_run(args) -> int:
    from .episode_files import load_supports, segment_queries
    from .imageio import check_readable, list_images, read_image, write_mask, write_overlay

    queries = list_images(args.query)
    check_readable(queries)
    cfg = config_from_args(args, shots=len(args.support))
    supports = load_supports(args.support, args.support_mask, cfg.image_size)
    if len(queries) > 1 and not Path(args.out).suffix == "":
        raise FSSAMError(f"--out {args.out}: with {len(queries)} queries, --out must be a folder")
    pipe = build_backend(args, cfg)
    t0 = time.perf_counter()
    for res in segment_queries(pipe, supports, queries, batch=args.batch, device=args.device):
        many = len(queries) > 1
        out = Path(args.out) / f"{res.path.stem}.png" if many else Path(args.out)
        write_mask(out, res.mask)
        if args.logits:
            import numpy as np

            np.save(Path(args.logits) / f"{res.path.stem}.npy" if many else args.logits, res.logits)
        if args.overlay:
            ov = Path(args.overlay) / f"{res.path.stem}.png" if many else Path(args.overlay)
            write_overlay(ov, read_image(res.path), res.mask)
        print(f"{res.path}: mask {out} ({res.mask.mean() * 100:.1f}% foreground)")
    dt = time.perf_counter() - t0
    print(f"{len(queries)} query(ies) against {len(args.support)} support(s) in {dt:.2f} s "
          f"({cfg.sam2_config}, {cfg.dino}, {cfg.image_size} px, {args.device})")
    return 0


def cmd_demo(args) -> int:
    from .demo_run import run_demo

    backends = args.backends.split(",") if args.backends else None
    return run_demo(Path(args.out_dir), seed=args.seed, preset=args.preset, backends=backends, device=args.device,
                    iters=args.iters)


def cmd_bench(args) -> int:
    from .bench.report import markdown_table
    from .bench.run import BenchSettings, run_bench

    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    cfg = config_from_args(args, shots=ints(args.shots)[0])  # --engine-dir serves the first shot count
    if not args.checkpoint:
        print(f"WARNING: no checkpoint given: RANDOM weights (seed {args.seed}); latency is real, masks are not.",
              file=sys.stderr)
    st = BenchSettings(backends=args.backends.split(","), batches=ints(args.batch), shots=ints(args.shots), cfg=cfg,
                       warmup=args.warmup, iters=args.iters, device=args.device, checkpoint=args.checkpoint,
                       seed=args.seed, engine_dir=args.engine_dir, threads=args.threads)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="benchmarking RANDOM weights")
        result = run_bench(st, args.out, progress=not args.no_progress)
    print(markdown_table(result))
    if args.out:
        print(f"wrote {args.out}/bench.json, bench.md, bench.png")
    return 0


def cmd_export(args) -> int:
    from .export.onnx_export import export_onnx

    cfg = config_from_args(args, shots=args.shots)
    if not args.checkpoint:
        print(f"WARNING: no checkpoint given: exporting RANDOM weights (seed {args.seed}).", file=sys.stderr)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.precision == "int8":
            from .export.quantize import export_int8

            out = export_int8(cfg, args.out, checkpoint=args.checkpoint, seed=args.seed, opset=args.opset,
                              batch=args.batch, progress=not args.no_progress)
        else:
            out = export_onnx(cfg, args.out, checkpoint=args.checkpoint, seed=args.seed, opset=args.opset,
                              batch=args.batch, precision=args.precision, progress=not args.no_progress)
        if args.tensorrt_plugin:
            from .export.onnx_plugin_variant import export_plugin_variants

            export_plugin_variants(cfg, out, checkpoint=args.checkpoint, seed=args.seed)
    print(f"wrote {out}/ (one {args.precision} ONNX graph per stage + manifest.json) in "
          f"{time.perf_counter() - t0:.0f} s")
    return 0


def cmd_build(args) -> int:
    """Engines for the local device: AOTInductor packages (from the checkpoint) or TensorRT (from ONNX)."""
    t0 = time.perf_counter()
    if args.format == "aoti":
        from .export.aoti import build_aoti

        cfg = config_from_args(args, shots=args.shots)
        if not args.checkpoint:
            print(f"WARNING: no checkpoint given: compiling RANDOM weights (seed {args.seed}).", file=sys.stderr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = build_aoti(cfg, args.out, checkpoint=args.checkpoint, seed=args.seed, device=args.device,
                             batch=int(args.batch), precision=args.precision, progress=not args.no_progress)
    else:
        from .export.tensorrt_build import build_tensorrt

        if not args.onnx_dir:
            raise FSSAMError("--format tensorrt needs --onnx-dir (graphs written by `fssam export`)")
        batch = tuple(int(x) for x in args.batch.split(","))
        if len(batch) == 1:
            batch = batch * 3
        if len(batch) != 3:
            raise FSSAMError(f"--batch {args.batch}: give one size or min,opt,max")
        out = build_tensorrt(args.onnx_dir, args.out, precision=args.precision, batch=batch,
                             timing_cache=args.timing_cache, workspace_gib=args.workspace, plugin=not args.no_plugin,
                             progress=not args.no_progress)
    print(f"wrote {out}/ ({args.format}, {args.precision}) in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_verify(args) -> int:
    from .export.verify import verify

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = verify(args.engine_dir, checkpoint=args.checkpoint, batch=args.batch)
    print(report.table())
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    print("PASS" if report.passed else "FAIL: outputs differ from PyTorch beyond tolerance")
    return 0 if report.passed else 1


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fssam",
                                description="FSSAM few-shot segmentation: demo, run, export, build, verify, bench")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="a built-in synthetic episode end to end: PyTorch, ONNX export, every "
                       "available backend, parity and speed table (no files, no weights needed)")
    d.add_argument("--out-dir", default="fssam-demo", help="where the mask, overlay, graphs and table are written")
    d.add_argument("--preset", default="tiny", help="config preset (tiny, paper, ...)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cuda" if _cuda() else "cpu")
    d.add_argument("--backends", help="comma list (default: every backend available on the device)")
    d.add_argument("--iters", type=int, default=3, help="timed episodes per backend")
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("run", help="segment query image(s) given support images and masks")
    add_model_flags(r)
    r.add_argument("--query", action="append", required=True, help="query image or folder (repeatable)")
    r.add_argument("--support", action="append", required=True, help="support image (repeat for K shots)")
    r.add_argument("--support-mask", action="append", required=True, help="mask of each --support, in order")
    r.add_argument("--out", required=True, help="mask PNG (a folder when there are several queries)")
    r.add_argument("--logits", help="also write float32 logits at the query's size (.npy; a folder for many)")
    r.add_argument("--overlay", help="also write the query with the mask tinted (PNG; a folder for many)")
    r.add_argument("--batch", type=int, default=1, help="queries per forward pass")
    r.add_argument("--backend", default="torch", choices=["torch", *ENGINE_SOURCES])
    r.add_argument("--engine-dir", help="graphs (`fssam export`) or engines (`fssam build`) for the backend")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("export", help="one ONNX graph per stage + manifest.json")
    add_model_flags(e)
    e.add_argument("--out", required=True, help="output folder (replaced atomically)")
    e.add_argument("--opset", type=int, default=18)
    e.add_argument("--batch", default="1", choices=["1", "dynamic"])
    e.add_argument("--shots", type=int, default=1)
    e.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8"],
                   help="fp16 / bf16: half graphs with fp32 islands (LayerNorm, softmax, min/max); bf16 ones are for "
                   "TensorRT (ONNX Runtime checks them emulated, in `fssam verify`); int8: the image encoder and "
                   "DINOv2 quantized for ONNX Runtime on the CPU")
    e.add_argument("--tensorrt-plugin", action="store_true", help="also write the decoder with the calibrated "
                   "attention as one custom node, for `fssam build --format tensorrt` with the fused-kernel plugin")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_export)

    bd = sub.add_parser("build", help="engines for this device: AOTInductor packages or TensorRT engines")
    add_model_flags(bd)
    bd.add_argument("--format", required=True, choices=["aoti", "tensorrt"])
    bd.add_argument("--out", required=True, help="output folder (replaced atomically)")
    bd.add_argument("--onnx-dir", help="tensorrt: the graphs written by `fssam export`")
    bd.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                    help="aoti: bf16/fp16 compile each stage under autocast; tensorrt: engine precision")
    bd.add_argument("--batch", default="1", help="aoti: the static batch; tensorrt: N or min,opt,max")
    bd.add_argument("--shots", type=int, default=1, help="aoti: shots per episode")
    bd.add_argument("--timing-cache", help="tensorrt: timing cache file, reused and extended")
    bd.add_argument("--workspace", type=float, help="tensorrt: workspace limit in GiB")
    bd.add_argument("--no-plugin", action="store_true", help="tensorrt: standard-op attention, no fused plugin")
    bd.add_argument("--no-progress", action="store_true")
    bd.set_defaults(func=cmd_build)

    v = sub.add_parser("verify", help="compare exported graphs with PyTorch (per stage and end to end)")
    v.add_argument("--engine-dir", required=True)
    v.add_argument("--checkpoint", help="the checkpoint the graphs were exported from (if any)")
    v.add_argument("--batch", type=int, default=1)
    v.add_argument("--json", help="also write the report as JSON")
    v.set_defaults(func=cmd_verify)

    b = sub.add_parser("bench", help="latency, throughput, memory and parity per backend")
    add_model_flags(b)
    b.add_argument("--backends", default="torch", help="comma list: torch, torch-bf16, torch-fused, torch-compile, "
                   "torch-compile-bf16, onnxruntime, onnxruntime-int8, aoti, aoti-bf16, tensorrt, tensorrt-graph")
    b.add_argument("--batch", default="1", help="comma list of batch sizes")
    b.add_argument("--shots", default="1", help="comma list of shot counts")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--iters", type=int, default=5)
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    b.add_argument("--engine-dir", help="exported graphs / engines for the onnxruntime, aoti backends")
    b.add_argument("--out", help="folder for bench.json, bench.md, bench.png")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except FSSAMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
