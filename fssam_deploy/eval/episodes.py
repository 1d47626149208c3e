"""The reference's test episodes: which query, class and supports, in which order; episodes.json.

The FSSAM reference (`test.py` `validate`, `util/dataset.py` `SemData.__getitem__`) draws its episodes
inside DataLoader worker processes, with `shuffle=False`, `batch_size_val: 1` and `workers: 32` (every
yaml), after `setup_seed(321)`. What fixes the sequence, reproduced here without a DataLoader:

- `validate` loops over the loader pass after pass; each pass (each `iter(loader)`) draws a base seed
  from the main torch RNG (`torch.empty((), dtype=torch.int64).random_()`), reseeded with 321 at the start
  of `validate`, so the warm-up call before it changes nothing. Worker w of that pass seeds Python's
  `random` with base_seed + w. With 0 workers the main process's `random` (seeded 321) serves every pass.
- Index i of a pass is served by worker i % workers (round-robin dispatch; results come back in index
  order), so each worker's `random` is consumed by indices w, w + W, w + 2W, ... in turn.
- Per index: the class is `present[randint(1, n) - 1]` over the fold classes in the query's label (any
  pixel count, ascending); per shot a support index is drawn once and discarded (the loop starts from the
  query's own path), then drawn again until it is neither the query nor an index already taken.
- The loader stacks shots in reverse (`cat([s_i, s_x])`), so the model sees the last drawn support first:
  `EpisodeSpec.supports` is in that order (the model's).

The sequence is the same for any episode count, so `--episodes N` is a prefix of the full protocol
(PASCAL: 1000 episodes; COCO: `--episodes`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from fssam_deploy.errors import InputError
from fssam_deploy.eval.datasets import FSSList, Pair

REFERENCE_SEED = 321
REFERENCE_WORKERS = 32
PASCAL_EPISODES = 1000
FORMAT = "fssam-eval-episodes"


@dataclass(frozen=True)
class EpisodeSpec:
    """One test episode (paths relative to the data root); supports in the model's order."""

    index: int
    query: Pair
    cls: int
    supports: tuple[Pair, ...]

    def to_json(self) -> dict:
        pair = lambda p: {"image": p[0], "label": p[1]}  # noqa: E731
        return {"index": self.index, "query": pair(self.query), "class": self.cls,
                "supports": [pair(s) for s in self.supports]}


def _draw(rng: random.Random, fss: FSSList, item: Pair, shots: int) -> tuple[int, tuple[Pair, ...]]:
    present = fss.query_classes(item)
    if not present:
        raise InputError(f"{fss.path(item[1])}: the list has this query but its label holds no fold-{fss.fold} "
                         f"class ({fss.classes}); the lists belong to another fold or data root")
    cls = present[rng.randint(1, len(present)) - 1]
    files = fss.class_files.get(cls, [])
    if sum(f != item for f in files) < shots:
        raise InputError(f"class {cls}: {len(files)} support candidate(s) in the lists ({fss.source}), too few for "
                         f"{shots} shot(s) besides the query {item[0]} (the reference would loop forever)")
    taken: list[int] = []
    drawn: list[Pair] = []
    for _ in range(shots):
        idx = rng.randint(1, len(files)) - 1  # drawn and discarded: the reference's loop starts at the query
        path = item
        while path == item or idx in taken:
            idx = rng.randint(1, len(files)) - 1
            path = files[idx]
        taken.append(idx)
        drawn.append(path)
    return cls, tuple(reversed(drawn))


def sample_episodes(fss: FSSList, shots: int, count: int, seed: int = REFERENCE_SEED,
                    workers: int = REFERENCE_WORKERS) -> list[EpisodeSpec]:
    """The first `count` episodes the reference's test loader yields for `fss` (see the module doc)."""
    if len(fss.items) < 2:
        raise InputError(f"{fss.source}: {len(fss.items)} query image(s); the reference's loop needs at least 2")
    if workers < 0:
        raise InputError(f"--workers {workers}: must be >= 0")
    gen = torch.Generator().manual_seed(seed)  # validate(): setup_seed(val_seed) -> torch.manual_seed
    main_rng = random.Random(seed)  # ... and random.seed, used when workers == 0
    out: list[EpisodeSpec] = []
    while len(out) < count:
        base_seed = torch.empty((), dtype=torch.int64).random_(generator=gen).item()  # one per iter(loader)
        rngs = [random.Random(base_seed + w) for w in range(workers)]
        for i, item in enumerate(fss.items):
            if len(out) >= count:
                break
            rng = rngs[i % workers] if workers else main_rng
            cls, supports = _draw(rng, fss, item, shots)
            out.append(EpisodeSpec(len(out), item, cls, supports))
    return out


def episodes_document(episodes: list[EpisodeSpec], meta: dict) -> dict:
    return {"format": FORMAT, "version": 1, **meta, "count": len(episodes),
            "episodes": [e.to_json() for e in episodes]}


def write_episodes(path: str | os.PathLike, episodes: list[EpisodeSpec], meta: dict) -> Path:
    """episodes.json: `meta` (dataset, fold, shots, seed, workers, lists, classes) and the episodes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(episodes_document(episodes, meta), indent=1))
    tmp.replace(path)
    return path


def _pair(d, where: str) -> Pair:
    if not isinstance(d, dict) or not isinstance(d.get("image"), str) or not isinstance(d.get("label"), str):
        raise InputError(f"{where}: expected {{'image': path, 'label': path}}, got {d!r}")
    return d["image"], d["label"]


def read_episodes(path: str | os.PathLike) -> tuple[dict, list[EpisodeSpec]]:
    """(meta, episodes) of an episodes.json written by `write_episodes` (`--episodes-file`)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"--episodes-file {path}: not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"--episodes-file {path}: not readable JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("episodes"), list):
        raise InputError(f"--episodes-file {path}: not an episode list (format {FORMAT!r}, written by "
                         "`fssam eval --episodes-only`)")
    eps = []
    for n, e in enumerate(doc["episodes"]):
        where = f"{path}: episode {n}"
        if not isinstance(e, dict) or not isinstance(e.get("class"), int) or not isinstance(e.get("supports"), list):
            raise InputError(f"{where}: expected query, class (int) and supports (list)")
        eps.append(EpisodeSpec(n, _pair(e.get("query"), where), e["class"],
                               tuple(_pair(s, where) for s in e["supports"])))
    meta = {k: v for k, v in doc.items() if k not in ("episodes", "format", "version", "count")}
    return meta, eps


def episodes_sha256(episodes: list[EpisodeSpec]) -> str:
    """A fingerprint of the episode sequence (what resume checks)."""
    return hashlib.sha256(json.dumps([e.to_json() for e in episodes]).encode()).hexdigest()
