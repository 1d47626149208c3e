"""Episodes/s of `fssam eval` per backend on a config preset, over the synthetic VOC-layout dataset.

    python benchmarks/bench_eval.py --preset paper --backends torch --episodes 3 [--out benchmarks/results]

Random weights (no checkpoint): the scores mean nothing, the speed and the agreement between backends do.
What is timed is what the eval times per episode and backend: support encoding + query (`with_supports` then
`segment`); reading and resizing the files is outside it, and is reported separately as wall time per episode.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
import warnings
from pathlib import Path

from fssam_deploy.backends.registry import get, open_backend
from fssam_deploy.eval.datasets import open_lists
from fssam_deploy.eval.episodes import sample_episodes
from fssam_deploy.eval.report import build_report, markdown
from fssam_deploy.eval.run import run_eval
from fssam_deploy.eval.synthetic import make_voc_dataset
from fssam_deploy.hostinfo import cpu_name
from fssam_deploy.model.config import FSSAMConfig


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper")
    p.add_argument("--backends", default="torch")
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="folder for eval_<preset>_<device>.{json,md}")
    args = p.parse_args(argv)
    cfg = FSSAMConfig.from_name(args.preset, shots=args.shots)
    names = args.backends.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_voc_dataset(Path(tmp) / "VOC2012")
        eps = sample_episodes(open_lists("pascal", root, 0), args.shots, args.episodes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backends = {n: open_backend(n, cfg, device=args.device, seed=0, build_missing=True) for n in names}
        try:
            t0 = time.perf_counter()
            run = run_eval(eps, backends, root, Path(tmp) / "out", cfg.image_size, progress=False)
            wall = time.perf_counter() - t0
        finally:
            for ep in backends.values():
                ep.close()
    info = {n: {"precision": get(n).precision} for n in names}
    report = build_report(run, {"dataset": "pascal (synthetic)", "fold": 0, "shots": args.shots, "random_weights": True,
                                "config": dataclasses.asdict(cfg), "device": args.device, "cpu": cpu_name(),
                                "wall_s_per_episode": wall / max(len(eps), 1)}, [1, 2, 3, 4, 5], info)
    print(markdown(report))
    for row in report["backends"]:
        print(f"{row['backend']}: {row['episodes_per_s']:.4f} episodes/s ({row['forward_ms_mean']:.0f} ms/episode)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"eval_{args.preset}_{args.device}"
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
        stem.with_suffix(".md").write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
