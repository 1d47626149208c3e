"""`fssam eval`: the FSS benchmark protocol (PASCAL-5i / COCO-20i) on any registered backend.

Wired into `fssam_deploy.cli` with `add_eval_parser(sub, add_model_flags, config_from_args)`: the model
flags come in as parameters, so this module never imports the top-level CLI (no import cycle).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

from fssam_deploy.errors import ConfigError
from fssam_deploy.eval.datasets import DATASETS, fold_classes, open_lists
from fssam_deploy.eval.episodes import (
    PASCAL_EPISODES,
    REFERENCE_SEED,
    REFERENCE_WORKERS,
    episodes_sha256,
    read_episodes,
    sample_episodes,
    write_episodes,
)


def add_eval_parser(sub, add_model_flags, config_from_args) -> argparse.ArgumentParser:
    """The `eval` subcommand on `sub` (argparse subparsers); `add_model_flags(parser)` adds --checkpoint,
    the config flags and --device; `config_from_args(args, shots)` makes the FSSAMConfig."""
    p = sub.add_parser("eval", conflict_handler="resolve",
                       help="mIoU / FB-IoU on PASCAL-5i or COCO-20i with the reference's episodes, on any backend(s)")
    add_model_flags(p)
    p.add_argument("--dataset", choices=DATASETS, help="pascal (VOC2012 layout) or coco (MSCOCO2014 layout)")
    p.add_argument("--data-root", required=True, help="VOC2012 folder (JPEGImages/, SegmentationClassAug/) or "
                   "MSCOCO2014 folder (val2014/, annotations/val2014/)")
    p.add_argument("--fold", type=int, choices=range(4), help="0..3")
    p.add_argument("--shots", type=int, default=1, choices=(1, 5))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--backend", help="one registered backend (default torch)")
    g.add_argument("--backends", help="comma list: the same episodes on each, compared with the first")
    p.add_argument("--engine-dir", action="append", default=[], metavar="[NAME=]DIR",
                   help="artifacts of the backends that need them; NAME=DIR for one backend (repeatable)")
    p.add_argument("--build-missing", action="store_true",
                   help="backends without --engine-dir build their artifacts into a temporary folder")
    p.add_argument("--episodes", type=int, help=f"the first N episodes of the sequence (default {PASCAL_EPISODES}, "
                   "the reference's count for PASCAL and test.sh's --episode for COCO)")
    p.add_argument("--seed", type=int, default=REFERENCE_SEED, help="episode seed (the reference's 321)")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the random weights used without a checkpoint")
    p.add_argument("--workers", type=int, default=REFERENCE_WORKERS,
                   help="the reference loader's worker count, part of what fixes the episodes (its yaml: 32)")
    p.add_argument("--lists", help="the reference's lists/<dataset> folder (fss_list/val/*_{fold}.txt, or val.txt "
                   "to build them from); default: built from the annotations")
    p.add_argument("--out", default="eval-out", help="folder for episodes.json, results.jsonl, report.{json,md}")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--episodes-file", help="replay this episodes.json instead of sampling")
    p.add_argument("--episodes-only", action="store_true", help="write episodes.json and stop (no model)")
    p.add_argument("--overlays", type=int, default=5, help="overlays of the N most disagreeing episodes per backend")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=functools.partial(cmd_eval, config_from_args=config_from_args))
    return p


def engine_dirs(values: list[str], names: list[str]) -> dict[str, str | None]:
    """--engine-dir values -> {backend: folder}; a bare DIR applies to every backend not named."""
    named, shared = {}, None
    for v in values:
        name, sep, folder = v.partition("=")
        if sep and name in names:
            named[name] = folder
        elif sep and not Path(v).exists():
            raise ConfigError(f"--engine-dir {v}: {name!r} is not one of --backends ({', '.join(names)})")
        elif shared is not None:
            raise ConfigError(f"--engine-dir given twice without a backend name ({shared}, {v}); use NAME=DIR")
        else:
            shared = v
    from fssam_deploy.backends.registry import get

    return {n: named.get(n, shared if get(n).engine_format else None) for n in names}


def _episodes(args, shots: int):
    """(meta, episodes) from --episodes-file or sampled from the lists."""
    if args.episodes_file:
        meta, eps = read_episodes(args.episodes_file)
        for flag, key in (("dataset", "dataset"), ("fold", "fold"), ("shots", "shots")):
            given = getattr(args, flag)
            if flag != "shots" and given is None:
                setattr(args, flag, meta.get(key))
            elif meta.get(key) is not None and given != meta.get(key):
                raise ConfigError(f"--{flag} {given}: --episodes-file {args.episodes_file} was written for "
                                  f"{key} {meta.get(key)}")
        if args.dataset is None or args.fold is None:
            raise ConfigError(f"--episodes-file {args.episodes_file}: no dataset/fold in it; pass --dataset, --fold")
        meta["episodes_file"] = str(args.episodes_file)
        return meta, eps[: args.episodes] if args.episodes else eps
    if args.dataset is None or args.fold is None:
        raise ConfigError("--dataset and --fold are needed (or --episodes-file)")
    fss = open_lists(args.dataset, args.data_root, args.fold, args.lists)
    eps = sample_episodes(fss, shots, args.episodes or PASCAL_EPISODES, seed=args.seed, workers=args.workers)
    meta = {"dataset": args.dataset, "fold": args.fold, "shots": shots, "seed": args.seed, "workers": args.workers,
            "lists": fss.source, "classes": fss.classes}
    return meta, eps


def _weights_meta(args) -> dict:
    from fssam_deploy.model.checkpoint import file_sha256

    files = {k: getattr(args, k) for k in ("checkpoint", "sam2_checkpoint", "dino_checkpoint") if getattr(args, k)}
    if not files:
        return {"weights": {"random_seed": args.weights_seed}, "random_weights": True}
    return {"weights": {k: {"path": str(v), "sha256": file_sha256(v)} for k, v in files.items()},
            "random_weights": False}


def open_backends(args, cfg, names: list[str]) -> dict:
    from fssam_deploy.backends.registry import open_backend

    dirs, opened = engine_dirs(args.engine_dir, names), {}
    try:
        for n in names:
            opened[n] = open_backend(n, cfg, device=args.device, engine_dir=dirs[n], checkpoint=args.checkpoint,
                                     sam2_checkpoint=args.sam2_checkpoint, dino_checkpoint=args.dino_checkpoint,
                                     seed=args.weights_seed, build_missing=args.build_missing)
    except BaseException:
        for ep in opened.values():
            ep.close()
        raise
    return opened


def _report(args, run, backends: dict, meta: dict, extra: dict) -> dict:
    """The report of a finished run (and the overlays of the most disagreeing episodes)."""
    from fssam_deploy.backends.registry import get
    from fssam_deploy.eval.report import build_report
    from fssam_deploy.eval.run import save_overlays
    from fssam_deploy.hostinfo import cpu_name

    info = {n: {"precision": get(n).precision, "accuracy": get(n).accuracy} for n in backends}
    report = build_report(run, {**meta, **extra, "device": str(args.device), "cpu": cpu_name()},
                          meta.get("classes") or fold_classes(meta["dataset"], meta["fold"]), info)
    if len(backends) > 1 and args.overlays > 0:
        paths = save_overlays(run, backends, args.data_root, args.out, backends[run.backends[0]].cfg.image_size,
                              args.overlays)
        report["overlays"] = [str(p) for p in paths]
    return report


def cmd_eval(args, config_from_args) -> int:
    """`fssam eval`: episodes, then every backend on them, then the report."""
    import warnings

    from fssam_deploy.eval.inputs import check_files
    from fssam_deploy.eval.report import markdown, write_report
    from fssam_deploy.eval.run import prepare_out, run_eval

    out = Path(args.out)
    meta, eps = _episodes(args, args.shots)
    if eps and len(eps[0].supports) != args.shots:
        raise ConfigError(f"--shots {args.shots}: the episodes have {len(eps[0].supports)} support(s) each")
    check_files(args.data_root, eps)
    if args.episodes_only:
        path = write_episodes(out / "episodes.json", eps, meta)
        print(f"{len(eps)} episodes ({meta['dataset']} fold {meta['fold']}, {args.shots}-shot) -> {path}")
        return 0
    cfg = config_from_args(args, shots=args.shots)
    names = [n.strip() for n in (args.backends or args.backend or "torch").split(",") if n.strip()]
    wmeta = _weights_meta(args)
    config = dataclasses.asdict(cfg)
    fingerprint = {"episodes_sha256": episodes_sha256(eps), "config": config, "weights": wmeta["weights"]}
    prepare_out(out, {"backends": names, **fingerprint}, args.resume)
    write_episodes(out / "episodes.json", eps, meta)
    print(f"{len(eps)} episodes ({meta['dataset']} fold {meta['fold']}, {args.shots}-shot) on {', '.join(names)}")
    if wmeta["random_weights"]:
        print(f"WARNING: no checkpoint given: RANDOM weights (seed {args.weights_seed}); the scores mean nothing "
              "about FSSAM, only the differences between backends do", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FSSAM is running with RANDOM weights")
        backends = open_backends(args, cfg, names)
    try:
        run = run_eval(eps, backends, args.data_root, out, cfg.image_size, fingerprint, resume=args.resume,
                       progress=not args.no_progress and sys.stderr.isatty())
        report = _report(args, run, backends, meta, {**wmeta, "config": config,
                                                      "episodes_sha256": fingerprint["episodes_sha256"]})
    finally:
        for ep in backends.values():
            ep.close()
    js, md = write_report(report, out)
    print(markdown(report))
    print(f"report: {js}, {md}")
    return 0
