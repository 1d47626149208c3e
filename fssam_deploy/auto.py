"""`--backend auto`, `--precision auto` and `--accuracy` on the command line (`fssam run|export|build|serve`).

The choice itself is `fssam_deploy.tune`'s (`choose`, `choose_precision`); this module adds the flag, names the
exact `fssam tune` command an untuned machine needs, and prints what was picked and why.
"""

from __future__ import annotations

import argparse
import sys


def add_accuracy_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--accuracy", default="exact", choices=["exact", "fast"],
                   help=f"with {what} auto: exact = fp32, mask IoU >= 0.999 vs PyTorch fp32; fast = bf16 / int8, "
                   "IoU >= 0.98 (as measured by `fssam tune` on this machine)")


def tune_command(args, shots: int) -> str:
    """The `fssam tune` line for the model flags of `args` (what `--backend auto` asks for when untuned)."""
    flags = [f"--sam2-config {args.sam2_config}", f"--dino {args.dino}", f"--image-size {args.image_size}",
             f"--shots {shots}", f"--device {args.device}"]
    if any(getattr(args, k, None) for k in ("checkpoint", "sam2_checkpoint", "dino_checkpoint")):
        flags.insert(0, "--checkpoint CKPT")
    return "fssam tune " + " ".join(flags)


def resolve_auto_backend(args, cfg) -> None:
    """`--backend auto`: the tuned pick for `--accuracy` and `--engine-dir` replaces it; says which and why."""
    if args.backend != "auto":
        return
    from fssam_deploy.tune import choose

    args.backend, why = choose(cfg, args.device, args.accuracy, args.engine_dir,
                               tune_command=tune_command(args, cfg.shots))
    print(why, file=sys.stderr)


def resolve_auto_precision(args, cfg, engine_format: str) -> None:
    """`--precision auto` of export / build: the precision of the fastest tuned reader of `engine_format`."""
    if args.precision != "auto":
        return
    from fssam_deploy.tune import choose_precision

    args.precision, why = choose_precision(cfg, args.device, args.accuracy, engine_format,
                                           tune_command=tune_command(args, cfg.shots))
    print(why, file=sys.stderr)
