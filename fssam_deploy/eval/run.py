"""The eval loop: the same episodes on one or more backends, partial results as it goes, `resume`.

Each episode's files are read once; on every backend its supports are encoded once (`with_supports`)
and the query segmented (`session.segment`); only that is timed, as the reference times only the model.
One JSON line per episode (every backend's intersection / union, seconds, and the mask IoU against the
first backend) is appended to `results.jsonl` and flushed to disk, so a run killed at any point resumes
(`resume=True`) from the last complete line; the scores are computed from the lines in episode order,
so a resumed run gives exactly the numbers of an uninterrupted one. `run.json` holds the run's
fingerprint (episodes, backends, config, weights); resuming a different run is refused.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fssam_deploy.errors import ConfigError
from fssam_deploy.eval.episodes import EpisodeSpec
from fssam_deploy.eval.inputs import load_episode
from fssam_deploy.eval.metrics import intersection_union, mask_iou, predict_mask

RESULTS = "results.jsonl"
RUN_FILE = "run.json"


@dataclass
class EvalRun:
    """What an eval computed: per episode one record (`results.jsonl` lines), the backends' names."""

    backends: list[str]
    episodes: list[EpisodeSpec]
    records: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0


def segment_episode(episode, inputs) -> tuple[torch.Tensor, float]:
    """(mask (H, W) bool at the label's size, seconds of the model) of one backend on one episode."""
    dev = episode.device
    t0 = time.perf_counter()
    session = episode.with_supports(inputs.supports.to(dev), inputs.masks.to(dev))
    logits = session.segment(inputs.query.to(dev))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = time.perf_counter() - t0
    return predict_mask(logits[0].cpu(), inputs.target.shape), dt


def evaluate_one(spec: EpisodeSpec, backends: dict, data_root: Path, size: int) -> dict:
    """One episode on every backend -> its record."""
    inputs = load_episode(data_root, spec, size)
    out, first = {}, None
    for name, episode in backends.items():
        mask, dt = segment_episode(episode, inputs)
        inter, union = intersection_union(mask, inputs.target)
        mask = mask.numpy()
        first = mask if first is None else first
        out[name] = {"intersection": inter.tolist(), "union": union.tolist(), "seconds": dt,
                     "agreement": mask_iou(first, mask), "fg_pixels": int(mask.sum())}
    return {"index": spec.index, "class": spec.cls, "query": spec.query[0], "backends": out}


def read_records(path: Path, backends: list[str]) -> list[dict]:
    """The complete lines of results.jsonl, in order; a torn last line (killed mid-write) is cut off."""
    if not path.is_file():
        return []
    records, good_end = [], 0
    with path.open("rb") as f:
        data = f.read()
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        if rec.get("index") != len(records) or sorted(rec.get("backends", {})) != sorted(backends):
            raise ConfigError(f"{path}: line {len(records) + 1} is not episode {len(records)} of this run's "
                              "backends; remove the folder (or choose another --out) and start again")
        records.append(rec)
        good_end += len(line)
    if good_end != len(data):
        with path.open("r+b") as f:
            f.truncate(good_end)
    return records


def prepare_out(out: Path, fingerprint: dict, resume: bool) -> None:
    """Check `out` for this run (resume: same fingerprint; else: no earlier partial results), then write
    run.json."""
    out = Path(out)
    run_file, results = out / RUN_FILE, out / RESULTS
    if resume and run_file.is_file():
        old = json.loads(run_file.read_text())
        diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if diff:
            raise ConfigError(f"--resume: {run_file} was written by another run (differs in {', '.join(diff)}); "
                              "rerun with its settings, or choose another --out")
        return
    if not resume and results.is_file() and results.stat().st_size:
        raise ConfigError(f"--out {out}: holds the partial results of an earlier run ({results}); pass --resume "
                          "to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    results.unlink(missing_ok=True)
    run_file.write_text(json.dumps(fingerprint, indent=1))


def _progress(total: int, done: int, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:.2f} episodes/s" if task.speed else "-- episodes/s")

    progress = Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), Rate(), TextColumn("ETA"),
                        TimeRemainingColumn(), disable=not enabled)
    task = progress.add_task("eval", total=total, completed=done)
    return progress, task


def run_eval(episodes: list[EpisodeSpec], backends: dict, data_root: str | os.PathLike, out: str | os.PathLike,
             image_size: int, fingerprint: dict | None = None, resume: bool = False,
             progress: bool = True) -> EvalRun:
    """Run `episodes` on `backends` ({name: Episode}, the first is the reference of agreement) into `out`."""
    out, names = Path(out), list(backends)
    prepare_out(out, {"backends": names, **(fingerprint or {})}, resume)
    path = out / RESULTS
    records = read_records(path, names) if resume else []
    run = EvalRun(names, episodes, records, resumed_from=len(records))
    bar, task = _progress(len(episodes), len(records), progress)
    t0 = time.perf_counter()
    with bar, path.open("a") as f:
        for spec in episodes[len(records):]:
            rec = evaluate_one(spec, backends, Path(data_root), image_size)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
            records.append(rec)
            bar.advance(task)
    run.seconds = time.perf_counter() - t0
    return run


def worst_episodes(run: EvalRun, backend: str, n: int = 5) -> list[dict]:
    """The `n` episodes where `backend`'s mask agrees least with the first backend's (lowest IoU first)."""
    recs = sorted(run.records, key=lambda r: (r["backends"][backend]["agreement"], r["index"]))
    return [{"index": r["index"], "query": r["query"], "class": r["class"],
             "iou": r["backends"][backend]["agreement"]} for r in recs[:n]]


def _tint(img: np.ndarray, mask: np.ndarray, color) -> np.ndarray:
    out = img.astype(np.float32).copy()
    out[mask] = out[mask] * 0.5 + np.asarray(color, np.float32) * 0.5
    return out.clip(0, 255).astype(np.uint8)


def save_overlays(run: EvalRun, backends: dict, data_root, out, image_size: int, n: int = 5) -> list[Path]:
    """For each backend after the first, its `n` most disagreeing episodes, re-run, as one PNG each: the
    query with its label, the first backend's mask, this backend's mask, and where they differ."""
    from PIL import Image

    names, written = list(backends), []
    for name in names[1:]:
        for w in worst_episodes(run, name, n):
            spec = run.episodes[w["index"]]
            inputs = load_episode(data_root, spec, image_size)
            ref, _ = segment_episode(backends[names[0]], inputs)
            got, _ = segment_episode(backends[name], inputs)
            ref, got, img = ref.numpy(), got.numpy(), inputs.query_image
            diff = np.zeros_like(img)
            diff[ref & got] = (60, 200, 60)
            diff[ref & ~got] = (230, 60, 40)
            diff[~ref & got] = (40, 90, 230)
            panel = np.concatenate([_tint(img, inputs.target == 1, (255, 220, 0)), _tint(img, ref, (255, 64, 32)),
                                    _tint(img, got, (32, 128, 255)), diff], axis=1)
            path = Path(out) / "overlays" / f"{name}_ep{spec.index:04d}_iou{w['iou']:.3f}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(panel).save(path)
            written.append(path)
    return written
