"""The `fssam` command: argparse subcommands, each one call into the library; backends from the one registry."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path

from fssam_deploy.auto import add_accuracy_flag, resolve_auto_backend, resolve_auto_precision
from fssam_deploy.backends import registry
from fssam_deploy.errors import ConfigError, FSSAMError
from fssam_deploy.eval.cli import add_eval_parser
from fssam_deploy.model.config import DINO_MODELS, REFINE_VERSIONS, SAM2_CONFIGS, FSSAMConfig
from fssam_deploy.preflight import (
    check_choices,
    check_device,
    check_positive,
    check_writable_folder,
    parse_int_list,
)
from fssam_deploy.serve.cli import add_serve_parsers

BUG = ("this is a bug in fssam-deploy, not in your input: please report it with the command line and the "
       "traceback above")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--checkpoint and the config flags shared by run, export, bench, build, eval, serve."""
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


def has_checkpoint(args) -> bool:
    return bool(getattr(args, "checkpoint", None) or getattr(args, "sam2_checkpoint", None)
                or getattr(args, "dino_checkpoint", None))


def warn_random(what: str, seed: int) -> None:
    print(f"WARNING: no checkpoint given: RANDOM weights (seed {seed}). {what}", file=sys.stderr)


def backend_help(device_note: bool = True) -> str:
    lines = [f"{b}: {registry.get(b).summary}" + (f" [{'/'.join(registry.get(b).devices)}]" if device_note else "")
             for b in registry.names()]
    return "; ".join(lines)


def open_episode(args, cfg: FSSAMConfig):
    """The episode of `--backend` (and `--engine-dir`) for `cfg`; warns when it runs random weights."""
    backend = registry.get(args.backend)
    backend.check(args.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FSSAM is running with RANDOM weights")
        episode = registry.open_backend(args.backend, cfg, device=args.device, engine_dir=args.engine_dir,
                                        checkpoint=args.checkpoint, sam2_checkpoint=args.sam2_checkpoint,
                                        dino_checkpoint=args.dino_checkpoint, seed=args.seed)
    weights = episode.manifest.get("weights", "") if episode.manifest is not None else ""
    if (episode.manifest is None and not has_checkpoint(args)) or str(weights).startswith("random:"):
        seed = weights.split(":")[1] if weights else args.seed
        warn_random("The masks mean nothing; use this only for export and speed work.", seed)
    return episode


def check_engine_dir(flag: str, folder: str, backends: list[str]) -> None:
    """`folder` is an artifact folder that one of `backends` reads (else a ConfigError naming the flag)."""
    from fssam_deploy.manifest import folder_format

    fmt = folder_format(folder)
    if fmt is None:
        raise ConfigError(f"{flag} {folder}: not an artifact folder (no manifest.json with a format); give a folder "
                          "written by `fssam export` or `fssam build`")
    if not any(registry.get(n).engine_format == fmt for n in backends):
        raise ConfigError(f"{flag} {folder}: holds {fmt!r} artifacts, which none of --backends {','.join(backends)} "
                          "reads; add the backend that reads them, or drop --engine-dir")


def cmd_run(args) -> int:
    from fssam_deploy.episode_files import load_supports, plan_outputs, segment_queries
    from fssam_deploy.imageio import check_readable, list_images, read_image, write_logits, write_mask, write_overlay

    device = check_device(args.device)
    cfg = config_from_args(args, shots=len(args.support))
    resolve_auto_backend(args, cfg)
    backend = registry.get(args.backend)
    if backend.engine_format and not args.engine_dir:
        raise FSSAMError(f"--backend {args.backend} needs --engine-dir (written by `{backend.engine_source}`)")
    check_positive("--batch", args.batch)
    backend.check(device)
    queries = list_images(args.query)
    plans = plan_outputs(queries, args.out, args.logits, args.overlay, inputs=[*args.support, *args.support_mask])
    check_readable([p.query for p in plans])
    supports = load_supports(args.support, args.support_mask, cfg.image_size)
    episode = open_episode(args, cfg)
    t0 = time.perf_counter()
    by_query = {str(p.query): p for p in plans}
    try:
        for res in segment_queries(episode, supports, [p.query for p in plans], batch=args.batch, device=device):
            plan = by_query[str(res.path)]
            write_mask(plan.mask, res.mask)
            if plan.logits:
                write_logits(plan.logits, res.logits)
            if plan.overlay:
                write_overlay(plan.overlay, read_image(res.path), res.mask)
            print(f"{res.path}: mask {plan.mask} ({res.mask.mean() * 100:.1f}% foreground)")
    finally:
        episode.close()
    print(f"{len(plans)} query(ies) against {len(args.support)} support(s) in {time.perf_counter() - t0:.2f} s "
          f"({cfg.sam2_config}, {cfg.dino}, {cfg.image_size} px, {args.backend} on {device})")
    return 0


def cmd_demo(args) -> int:
    from fssam_deploy.demo import run_demo

    device = check_device(args.device)
    backends = None
    if args.backends:
        backends = check_choices("--backends", args.backends.split(","), registry.names())
        for name in backends:
            registry.get(name).check(device)
    return run_demo(Path(args.out_dir), seed=args.seed, preset=args.preset, backends=backends, device=str(device),
                    iters=check_positive("--iters", args.iters), force=args.force)


def cmd_bench(args) -> int:
    from fssam_deploy.bench.report import markdown_table
    from fssam_deploy.bench.run import BenchSettings, run_bench

    device = check_device(args.device)
    names = check_choices("--backends", args.backends.split(","), registry.names())
    for name in names:
        registry.get(name).check(device)
    batches, shots = parse_int_list("--batch", args.batch), parse_int_list("--shots", args.shots)
    threads = None if args.threads is None else check_positive("--threads", args.threads)
    if args.engine_dir is not None:
        check_engine_dir("--engine-dir", args.engine_dir, names)
    if args.out:
        check_writable_folder(args.out, f"--out {args.out}")
    cfg = config_from_args(args, shots=shots[0])  # --engine-dir serves the first shot count
    if not args.checkpoint:
        warn_random("Latency is real, masks are not.", args.seed)
    st = BenchSettings(backends=names, batches=batches, shots=shots, cfg=cfg,
                       warmup=check_positive("--warmup", args.warmup, 0), iters=check_positive("--iters", args.iters),
                       device=str(device), checkpoint=args.checkpoint, seed=args.seed, engine_dir=args.engine_dir,
                       threads=threads)
    result = run_bench(st, args.out, progress=not args.no_progress)
    print(markdown_table(result))
    if args.out:
        print(f"wrote {args.out}/bench.json, bench.md, bench.png")
    return 0


def cmd_export(args) -> int:
    from fssam_deploy.atomic import check_output_dir
    from fssam_deploy.onnx.export import export_onnx

    device = check_device(args.device)
    check_output_dir(args.out, force=args.force)
    if args.triton_repo:
        check_triton_repo_flags(args)
    if args.opset < 18:
        raise FSSAMError(f"--opset {args.opset}: the exporter writes opset 18 or newer (standard-op attention, "
                         "LayerNorm); give --opset 18 or higher")
    cfg = config_from_args(args, shots=check_positive("--shots", args.shots))
    from fssam_deploy.onnx.export import ONNX_FORMAT

    resolve_auto_precision(args, cfg, ONNX_FORMAT)
    if not has_checkpoint(args):
        warn_random("Exporting them.", args.seed)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.precision == "int8":
            from fssam_deploy.onnx.quantize import export_int8

            out = export_int8(cfg, args.out, checkpoint=args.checkpoint, seed=args.seed, opset=args.opset,
                              batch=args.batch, progress=not args.no_progress, force=args.force)
        else:
            out = export_onnx(cfg, args.out, checkpoint=args.checkpoint, seed=args.seed, opset=args.opset,
                              batch=args.batch, precision=args.precision, progress=not args.no_progress,
                              force=args.force)
        if args.tensorrt_plugin:
            from fssam_deploy.onnx.plugin_variant import export_plugin_variants

            export_plugin_variants(cfg, out, checkpoint=args.checkpoint, seed=args.seed)
    print(f"wrote {out}/ (one {args.precision} ONNX graph per stage + manifest.json) in "
          f"{time.perf_counter() - t0:.0f} s")
    if args.triton_repo:
        from fssam_deploy.serve.triton_repo import write_triton_repo

        repo = write_triton_repo(out, args.triton_repo, platform="onnxruntime", max_batch=args.triton_max_batch,
                                 instances=args.triton_instances, gpu=device.type == "cuda")
        print(f"wrote {repo}/ (Triton model repository: one onnxruntime model per stage + the fssam_episode BLS "
              f"model; `tritonserver --model-repository {repo}`)")
    return 0


def check_triton_repo_flags(args) -> None:
    """--triton-repo needs a new folder, dynamic-batch graphs ONNX Runtime runs, and tritonclient: checked up front."""
    from fssam_deploy.serve.triton_repo import _pb

    if Path(args.triton_repo).exists():
        raise ConfigError(f"--triton-repo {args.triton_repo}: exists; give a new folder (nothing is overwritten)")
    check_writable_folder(Path(args.triton_repo).resolve().parent, f"--triton-repo {args.triton_repo}")
    if args.batch != "dynamic":
        raise ConfigError("--triton-repo: Triton batches requests on the first axis; add --batch dynamic")
    if args.precision == "bf16":
        raise ConfigError("--triton-repo: Triton's onnxruntime backend has no bf16 kernels; export fp32, fp16 or "
                          "int8 graphs for it (bf16 graphs are for TensorRT)")
    check_positive("--triton-max-batch", args.triton_max_batch)
    check_positive("--triton-instances", args.triton_instances)
    _pb()  # tritonclient's model_config_pb2 writes and checks the configs


def cmd_build(args) -> int:
    """Engines for this device, by the registry's builder of `--format`."""
    from fssam_deploy.atomic import check_output_dir

    backend = registry.build_formats()[args.format]
    device = check_device(args.device)
    backend.check(device)
    check_output_dir(args.out, force=args.force)
    cfg = config_from_args(args, shots=check_positive("--shots", args.shots))
    resolve_auto_precision(args, cfg, backend.engine_format)
    if args.onnx_dir is None and not has_checkpoint(args):
        warn_random("Compiling them.", args.seed)
    options = {"timing_cache": args.timing_cache, "workspace": args.workspace, "no_plugin": args.no_plugin,
               "calibration_dir": args.calibration_dir}
    req = registry.BuildRequest(cfg=cfg, out=Path(args.out), device=device, checkpoint=args.checkpoint,
                                seed=args.seed, source_dir=Path(args.onnx_dir) if args.onnx_dir else None,
                                precision=args.precision, batch=args.batch, progress=not args.no_progress,
                                force=args.force, options=options)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = backend.build(req)
    print(f"wrote {out}/ ({args.format}, {args.precision}) in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_tune(args) -> int:
    from fssam_deploy.tune import run_tune, tune_table

    device = check_device(args.device)
    if args.backends:
        names = check_choices("--backends", args.backends.split(","), registry.names())
        for name in names:
            registry.get(name).check(device)
    else:
        names = None  # run_tune's default list (default_backends), less what skip_reason leaves out
    threads = None if args.threads is None else check_positive("--threads", args.threads)
    cfg = config_from_args(args, shots=check_positive("--shots", args.shots))
    if not has_checkpoint(args):
        warn_random("Speeds are real; IoUs of random weights are pessimistic: tune with --checkpoint.", args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_tune(cfg, device=str(device), backends=names, checkpoint=args.checkpoint, seed=args.seed,
                          threads=threads, warmup=check_positive("--warmup", args.warmup, 0),
                          iters=check_positive("--iters", args.iters), progress=not args.no_progress,
                          on_row=lambda line: print(line, flush=True))
    print(tune_table(result))
    from fssam_deploy.tune import choose

    for accuracy in ("exact", "fast"):
        try:
            print(choose(cfg, device, accuracy, threads=threads)[1])
        except ConfigError as exc:
            print(f"auto ({accuracy}): {exc}")
    print(f"wrote {result['path']}")
    return 0


def cmd_verify(args) -> int:
    from fssam_deploy.verify import verify

    check_positive("--batch", args.batch)
    check_device(args.device)
    if args.json:
        if Path(args.json).is_dir():
            raise ConfigError(f"--json {args.json}: is a folder; give a file name for the JSON report")
        check_writable_folder(Path(args.json).parent, f"--json {args.json}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = verify(args.engine_dir, checkpoint=args.checkpoint, batch=args.batch, device=args.device,
                        backend=args.backend)
    print(report.table())
    if args.json:  # written whole or not at all; it names the machine, which the speed columns depend on
        import json

        from fssam_deploy.hostinfo import host_summary
        from fssam_deploy.imageio import atomic_write

        data = {**report.to_dict(), "host": host_summary(), "device": args.device}
        atomic_write(args.json, lambda f: f.write(json.dumps(data, indent=2).encode()))
    print("PASS" if report.passed else "FAIL: outputs differ from PyTorch beyond tolerance")
    return 0 if report.passed else 1


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def add_run_parser(sub) -> None:
    r = sub.add_parser("run", help="segment query image(s) given support images and masks")
    add_model_flags(r)
    r.add_argument("--query", action="append", required=True, help="query image or folder (repeatable)")
    r.add_argument("--support", action="append", required=True, help="support image (repeat for K shots)")
    r.add_argument("--support-mask", action="append", required=True, help="mask of each --support, in order")
    r.add_argument("--out", required=True, help="mask PNG (a folder when there are several queries)")
    r.add_argument("--logits", help="also write float32 logits at the query's size (.npy; a folder for many)")
    r.add_argument("--overlay", help="also write the query with the mask tinted (PNG; a folder for many)")
    r.add_argument("--batch", type=int, default=1, help="queries per forward pass")
    r.add_argument("--backend", default="torch", choices=["auto", *registry.names()], metavar="NAME",
                   help="auto: the fastest backend `fssam tune` measured here that meets --accuracy and reads "
                   "--engine-dir (or needs none); " + backend_help())
    r.add_argument("--engine-dir", help="graphs (`fssam export`) or engines (`fssam build`) for the backend")
    add_accuracy_flag(r, "--backend")
    r.set_defaults(func=cmd_run)


def add_artifact_parsers(sub) -> None:
    e = sub.add_parser("export", help="one ONNX graph per stage + manifest.json")
    add_model_flags(e)
    e.add_argument("--out", required=True, help="output folder (a new one, or one `fssam export` wrote)")
    e.add_argument("--force", action="store_true", help="replace --out even if it is not a folder this tool wrote")
    e.add_argument("--opset", type=int, default=18)
    e.add_argument("--batch", default="1", choices=["1", "dynamic"])
    e.add_argument("--shots", type=int, default=1)
    add_accuracy_flag(e, "--precision")
    e.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8", "auto"],
                   help="fp16 / bf16: half graphs with fp32 islands (LayerNorm, softmax, min/max); bf16 ones are for "
                   "TensorRT (ONNX Runtime checks them emulated, in `fssam verify`); int8: the image encoder and "
                   "DINOv2 quantized for ONNX Runtime on the CPU; auto: what `fssam tune` measured fastest for "
                   "--accuracy")
    e.add_argument("--tensorrt-plugin", action="store_true", help="also write the decoder with the calibrated "
                   "attention as one custom node, for `fssam build --format tensorrt` with the fused-kernel plugin")
    e.add_argument("--triton-repo", help="also write a Triton model repository there (a new folder): one "
                   "onnxruntime model per stage and the `fssam_episode` BLS model (needs --batch dynamic)")
    e.add_argument("--triton-max-batch", type=int, default=8, help="--triton-repo: max_batch_size of each model")
    e.add_argument("--triton-instances", type=int, default=1, help="--triton-repo: instances per model")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_export)

    formats = registry.build_formats()
    bd = sub.add_parser("build", help="engines for this device: " + ", ".join(formats))
    add_model_flags(bd)
    bd.add_argument("--format", required=True, choices=list(formats),
                    help="; ".join(f"{f}: {b.summary}" for f, b in formats.items()))
    bd.add_argument("--out", required=True, help="output folder (a new one, or one `fssam build` wrote)")
    bd.add_argument("--force", action="store_true", help="replace --out even if it is not a folder this tool wrote")
    bd.add_argument("--onnx-dir", help="the graphs written by `fssam export` (formats built from ONNX)")
    bd.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8", "auto"],
                    help="aoti: bf16/fp16 compile each stage under autocast; tensorrt: engine precision; openvino: "
                    "fp32, bf16 or int8; auto: what `fssam tune` measured fastest for --accuracy")
    add_accuracy_flag(bd, "--precision")
    bd.add_argument("--batch", default="1", help="the static batch (aoti, openvino); tensorrt: N or min,opt,max")
    bd.add_argument("--shots", type=int, default=1, help="shots per episode (formats built from a checkpoint)")
    bd.add_argument("--timing-cache", help="tensorrt: timing cache file, reused and extended")
    bd.add_argument("--workspace", type=float, help="tensorrt: workspace limit in GiB")
    bd.add_argument("--no-plugin", action="store_true", help="tensorrt: standard-op attention, no fused plugin")
    bd.add_argument("--calibration-dir", help="int8: images to calibrate on (default: synthetic episodes)")
    bd.add_argument("--no-progress", action="store_true")
    bd.set_defaults(func=cmd_build)

    v = sub.add_parser("verify", help="compare an artifact folder with PyTorch (per stage and end to end)")
    v.add_argument("--engine-dir", required=True, help="graphs, packages or engines (any backend's folder)")
    v.add_argument("--checkpoint", help="the checkpoint the folder was made from (if any)")
    v.add_argument("--batch", type=int, default=1)
    v.add_argument("--device", default="cpu", help="where the folder's backend runs")
    v.add_argument("--backend", help="the backend that runs the folder (default: its format's reader of the "
                   "folder's precision; e.g. openvino-bf16 or openvino-int8-bf16 to check a runtime bf16 hint)")
    v.add_argument("--json", help="also write the report as JSON")
    v.set_defaults(func=cmd_verify)


def add_demo_bench_parsers(sub) -> None:
    d = sub.add_parser("demo", help="a built-in synthetic episode end to end: PyTorch, ONNX export, every "
                       "available backend, parity and speed table (no files, no weights needed)")
    d.add_argument("--out-dir", default="fssam-demo", help="where the mask, overlay, graphs and table are written")
    d.add_argument("--force", action="store_true", help="write into --out-dir even if it holds files of others")
    d.add_argument("--preset", default="tiny", help="config preset (tiny, paper, ...)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cuda" if _cuda() else "cpu")
    d.add_argument("--backends", help="comma list (default: every backend available on the device): "
                   + ", ".join(registry.names()))
    d.add_argument("--iters", type=int, default=3, help="timed episodes per backend")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="latency, throughput, memory and parity per backend")
    add_model_flags(b)
    b.add_argument("--backends", default="torch", help="comma list of " + backend_help())
    b.add_argument("--batch", default="1", help="comma list of batch sizes")
    b.add_argument("--shots", default="1", help="comma list of shot counts")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--iters", type=int, default=5)
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    b.add_argument("--engine-dir", help="exported graphs / engines for the backends that take them")
    b.add_argument("--out", help="folder for bench.json, bench.md, bench.png")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser("tune", help="measure every installed backend here once and cache the result, for "
                       "--backend auto / --precision auto")
    add_model_flags(t)
    t.add_argument("--shots", type=int, default=1)
    t.add_argument("--backends", help="comma list (default: every backend available on the device)")
    t.add_argument("--warmup", type=int, default=1)
    t.add_argument("--iters", type=int, default=3)
    t.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_tune)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fssam", description="FSSAM few-shot segmentation: demo, run, export, build, "
                                "verify, bench, tune, eval, serve, client")
    sub = p.add_subparsers(dest="command", required=True)
    add_demo_bench_parsers(sub)
    add_run_parser(sub)
    add_artifact_parsers(sub)
    add_eval_parser(sub, add_model_flags, config_from_args)
    add_serve_parsers(sub, add_model_flags, config_from_args)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except FSSAMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (nothing half-written is left: outputs are written atomically)", file=sys.stderr)
        return 130
    except Exception:  # our bug: the traceback, and a line that says so
        traceback.print_exc()
        print(f"error: {BUG}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
