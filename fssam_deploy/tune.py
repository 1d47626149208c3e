"""`fssam tune` and `--backend auto`: the machine decides, from a short measurement cached per machine.

`tune` runs every backend available on the device (the registry's, `Backend.tune`) for one synthetic 1-batch
episode of the config, a few times, through `fssam bench`'s own measurement, and scores each against PyTorch fp32:
episode latency and mask IoU. It writes the rows to `<user cache>/fssam-deploy/tune/<key>.json` (platformdirs'
cache folder, or `$FSSAM_CACHE_DIR`; never inside the package), where `key` hashes what decides speed: CPU model
and ISA (or GPU), thread count, torch / onnxruntime / openvino versions, device, config (shots included).

`choose(...)` then picks, for an accuracy class, the fastest measured backend that meets it and that can run what
the user gave (`--engine-dir`'s format and precision, or no artifacts: the PyTorch backends), and says why:
  exact: an fp32 backend whose masks had IoU >= 0.999 against PyTorch fp32 (logits within 1e-3 of their scale);
  fast:  any backend with IoU >= 0.98 (bf16, int8).
Random weights make those IoUs pessimistic (their logits lie within +-0.3 of 0); tune with the checkpoint.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

import torch

from fssam_deploy.backends import registry
from fssam_deploy.errors import ConfigError, FSSAMError
from fssam_deploy.manifest import folder_manifest
from fssam_deploy.model.config import FSSAMConfig

TUNE_FORMAT = "fssam-tune/1"
MIN_IOU = {"exact": 0.999, "fast": 0.98}
EXACT_MAX_REL_ERR = 1e-3  # exact also needs max |logit err| <= this x the reference logits' max |value|


def cache_dir() -> Path:
    """`$FSSAM_CACHE_DIR`, else the user's cache folder (platformdirs: ~/.cache/fssam-deploy on Linux)."""
    if os.environ.get("FSSAM_CACHE_DIR"):
        return Path(os.environ["FSSAM_CACHE_DIR"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("fssam-deploy"))


def machine(device: str | torch.device, threads: int | None) -> dict:
    """What decides which backend is fastest here."""
    from fssam_deploy.hostinfo import cpu_info, host_summary

    dev = torch.device(device)
    threads = threads or torch.get_num_threads()
    info = cpu_info()
    out = {"device": dev.type, "threads": threads, "host": host_summary(threads), "cpu": info["model"],
           "isa": sorted(f for f, on in info["features"].items() if on), "torch": torch.__version__}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
    dists = metadata.packages_distributions()  # module -> installed distributions (onnxruntime-gpu, tensorrt-cu12)
    for mod in ("onnxruntime", "openvino", "tensorrt"):
        for dist in dists.get(mod, [])[:1]:
            out[mod] = metadata.version(dist)  # read from the metadata: nothing is imported
    return out


def tune_key(cfg: FSSAMConfig, mach: dict) -> str:
    blob = json.dumps({"config": cfg.to_dict(), **{k: v for k, v in mach.items() if k != "host"}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tune_path(cfg: FSSAMConfig, device, threads: int | None = None) -> Path:
    return cache_dir() / "tune" / f"{tune_key(cfg, machine(device, threads))}.json"


def meets(row: dict) -> list[str]:
    """The accuracy classes a measured row meets."""
    if "mask_iou" not in row:
        return []
    out = []
    rel = row["max_abs_logit_err"] / max(row.get("ref_abs_max", 0.0), 1e-12)
    if row["accuracy"] == "exact" and row["mask_iou"] >= MIN_IOU["exact"] and rel <= EXACT_MAX_REL_ERR:
        out.append("exact")
    if row["mask_iou"] >= MIN_IOU["fast"]:
        out.append("fast")
    return out


def default_backends(device) -> list[str]:
    dev = torch.device(device)
    return [n for n in registry.names(dev, available_only=True) if dev.type in registry.get(n).tune]


def skip_reason(b: registry.Backend, rows: list[dict], device) -> str | None:
    """Why the default list leaves out `b` here, from the CPU's ISA and what was measured before it (None:
    measure it). A compiled bf16 backend is left out on a CPU with neither AVX512-BF16 nor AMX-BF16 where eager
    bf16 autocast also ran slower than fp32: bf16 is emulated there (seen: 7x slower than fp32 on an AVX2 EPYC),
    compiling cannot make it the fastest, and compiling costs minutes. `--backends` measures it anyway."""
    from fssam_deploy.hostinfo import cpu_info

    if torch.device(device).type != "cpu" or not (b.jit and b.precision == "bf16"):
        return None
    features = cpu_info()["features"]
    if features.get("avx512_bf16") or features.get("amx_bf16"):
        return None
    got = {r["backend"]: r.get("episode_ms") for r in rows}
    fp32, bf16 = got.get("torch"), got.get("torch-bf16")
    if fp32 and bf16 and bf16 > fp32:
        return (f"no native bf16 on this CPU (no AVX512-BF16, no AMX-BF16) and eager bf16 ran slower than fp32 "
                f"({bf16:.0f} vs {fp32:.0f} ms per episode)")
    return None


def run_tune(cfg: FSSAMConfig, device="cpu", backends: list[str] | None = None, checkpoint: str | None = None,
             seed: int = 0, threads: int | None = None, warmup: int = 1, iters: int = 3,
             progress: bool = True, on_row=None) -> dict:
    """Measure `backends` (default: `default_backends`, less what `skip_reason` leaves out) one by one and write
    the cache file; returns its JSON.

    A backend that fails to build or run here is kept as a row with its `error` and never picked. `progress`:
    the bench's progress bar; `on_row(line)`: called with a line per measured backend."""
    from fssam_deploy.bench.run import BenchSettings, run_bench

    names = backends or default_backends(device)
    if "torch" not in names:
        names = ["torch", *names]  # the baseline every ratio is over
    mach = machine(device, threads)
    rows = []
    for name in names:
        b = registry.get(name)
        row = {"backend": name, "accuracy": b.accuracy, "precision": b.precision, "engine_format": b.engine_format}
        why_not = None if backends else skip_reason(b, rows, device)
        if why_not:
            row.update(skipped=why_not, meets=[])
            rows.append(row)
            if on_row is not None:
                on_row(f"tune: {name}: skipped: {why_not}; compiling bf16 (minutes) cannot win here; name it in "
                       "--backends to measure it anyway")
            continue
        st = BenchSettings(backends=[name], batches=[1], shots=[cfg.shots], cfg=cfg, warmup=warmup, iters=iters,
                           device=str(device), checkpoint=checkpoint, seed=seed, threads=threads, gemm_floor=False)
        try:
            r = run_bench(st, progress=progress)["rows"][0]
        except (FSSAMError, RuntimeError, OSError, ValueError) as exc:  # one backend's failure is its row's
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        else:
            row.update(episode_ms=r["episode"]["median_ms"], cached_query_ms=r["cached_query"]["median_ms"],
                       mask_iou=r["mask_iou"], max_abs_logit_err=r["max_abs_logit_err"],
                       ref_abs_max=r.get("ref_abs_max", 0.0), first_episode_ms=r.get("first_episode_ms"))
        row["meets"] = meets(row)
        rows.append(row)
        if on_row is not None:
            on_row(f"tune: {name}: " + (row.get("error") or f"{row['episode_ms']:.1f} ms per episode, mask IoU "
                                        f"{row['mask_iou']:.4f}, meets {row['meets'] or 'no class'}"))
    base = next((r for r in rows if r["backend"] == "torch" and "episode_ms" in r), None)
    for r in rows:
        if base and "episode_ms" in r:
            r["speedup_vs_torch"] = base["episode_ms"] / r["episode_ms"]
    result = {"format": TUNE_FORMAT, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "config": cfg.to_dict(), "machine": mach, "weights": "checkpoint" if checkpoint else
        f"random:{seed}", "settings": {"batch": 1, "warmup": warmup, "iters": iters}, "rows": rows}
    path = cache_dir() / "tune" / f"{tune_key(cfg, mach)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # ours: written whole, then renamed over our old one
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    result["path"] = str(path)
    return result


def read_tune(cfg: FSSAMConfig, device, threads: int | None = None) -> dict | None:
    path = tune_path(cfg, device, threads)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != TUNE_FORMAT or not isinstance(data.get("rows"), list):
        return None
    data["path"] = str(path)
    return data


def candidates(engine_dir: str | None) -> tuple[list[str], str]:
    """Backends that can run with what the user gave, and a phrase saying what that is."""
    if engine_dir is None:
        return [n for n in registry.names() if registry.get(n).engine_format is None], "no --engine-dir"
    data = folder_manifest(engine_dir)
    if data is None:
        raise ConfigError(f"--engine-dir {engine_dir}: not an artifact folder (no manifest.json with a format); give "
                          "a folder written by `fssam export` or `fssam build`")
    fmt, precision = data["format"], str(data.get("precision", "fp32"))
    names = [b.name for b in registry.by_engine_format(fmt) if b.loads_precision(precision)]
    return names, f"--engine-dir {engine_dir} ({fmt}, {precision})"


def choose(cfg: FSSAMConfig, device, accuracy: str, engine_dir: str | None = None,
           threads: int | None = None, tune_command: str = "fssam tune") -> tuple[str, str]:
    """(backend name, why) for `--backend auto`: see the module docstring. Reads only the cache file."""
    if accuracy not in MIN_IOU:
        raise ConfigError(f"--accuracy {accuracy!r}: choose from {list(MIN_IOU)}")
    data = read_tune(cfg, device, threads)
    if data is None:
        raise ConfigError(f"--backend auto: this machine has not been tuned for this config and device "
                          f"({tune_path(cfg, device, threads)} is missing); run `{tune_command}` first (it measures "
                          f"every installed backend once and caches the result)")
    allowed, given = candidates(engine_dir)
    rows = sorted((r for r in data["rows"] if accuracy in r.get("meets", ()) and "episode_ms" in r),
                  key=lambda r: r["episode_ms"])
    usable = [r for r in rows if r["backend"] in allowed and registry.get(r["backend"]).unavailable(device) is None]
    if not usable:
        raise ConfigError(f"--backend auto --accuracy {accuracy}: no tuned backend meets it and runs with {given} "
                          f"(tuned: {', '.join(r['backend'] for r in rows) or 'none that meets it'}; readable: "
                          f"{', '.join(allowed)}); see {data['path']}")
    best = usable[0]
    why = (f"auto: {best['backend']} ({accuracy}: {best['episode_ms']:.0f} ms per episode, mask IoU "
           f"{best['mask_iou']:.4f} vs PyTorch fp32, {best.get('speedup_vs_torch', 1.0):.2f}x torch; "
           f"measured {data['created']} on {data['machine']['host']}, weights {data['weights']}; {data['path']})")
    first = best.get("first_episode_ms") or 0.0
    if first > 2 * best["episode_ms"] + 1e3:
        why += (f"; its first episode after loading took {first / 1e3:.0f} s here (compilation), so it pays off over "
                f"many queries (`fssam serve`, a folder of queries)")
    faster = [r for r in rows if r["episode_ms"] < best["episode_ms"] and r["backend"] not in allowed]
    if faster:
        f = faster[0]
        why += (f"; faster with other artifacts: {f['backend']} ({f['episode_ms']:.0f} ms, from "
                f"`{registry.get(f['backend']).engine_source}`)")
    return best["backend"], why


def choose_precision(cfg: FSSAMConfig, device, accuracy: str, engine_format: str, threads: int | None = None,
                     tune_command: str = "fssam tune") -> tuple[str, str]:
    """`--precision auto` of `fssam export` / `fssam build`: the precision of the fastest tuned backend that reads
    `engine_format` and meets `accuracy`; (precision, why)."""
    data = read_tune(cfg, device, threads)
    if data is None:
        raise ConfigError(f"--precision auto: this machine has not been tuned for this config "
                          f"({tune_path(cfg, device, threads)} is missing); run `{tune_command}` first")
    readers = {b.name for b in registry.by_engine_format(engine_format)}
    rows = sorted((r for r in data["rows"] if r["backend"] in readers and accuracy in r.get("meets", ())
                   and "episode_ms" in r), key=lambda r: r["episode_ms"])
    if not rows:
        raise ConfigError(f"--precision auto --accuracy {accuracy}: no tuned backend of these artifacts "
                          f"({', '.join(sorted(readers))}) meets it; see {data['path']}")
    best = rows[0]
    return best["precision"], (f"auto: --precision {best['precision']} (fastest {accuracy} reader: "
                               f"{best['backend']}, {best['episode_ms']:.0f} ms per episode, mask IoU "
                               f"{best['mask_iou']:.4f}; {data['path']})")


def tune_table(result: dict) -> str:
    lines = [f"Tuned on {result['machine']['host']} ({result['machine']['device']}), weights {result['weights']}.",
             "", "| backend | accuracy | episode ms | vs torch | cached query ms | mask IoU | max logit err | meets | "
             "first episode s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r or "skipped" in r:
            what = f"failed: {r['error'][:80]}" if "error" in r else f"skipped: {r['skipped']}"
            lines.append(f"| {r['backend']} | {r['accuracy']} | {what} | | | | | | |")
            continue
        lines.append(f"| {r['backend']} | {r['accuracy']} | {r['episode_ms']:.1f} | "
                     f"{r.get('speedup_vs_torch', float('nan')):.2f}x | {r['cached_query_ms']:.1f} | "
                     f"{r['mask_iou']:.4f} | {r['max_abs_logit_err']:.2e} | {', '.join(r['meets']) or '-'} | "
                     + (f"{r['first_episode_ms'] / 1e3:.1f} |" if r.get("first_episode_ms") else "- |"))
    return "\n".join(lines)
