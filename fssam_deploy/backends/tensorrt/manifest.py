"""The manifest of a TensorRT engine folder (`engines.json`), the build settings, profiles and staleness checks.

A TensorRT engine runs only on the GPU model it was built on (its kernels were chosen and
compiled for that GPU and compute capability), with the TensorRT version that built it, and is
only as current as the ONNX graph it came from. `engines.json` records all of it, and
`read_trt_manifest` refuses a folder whose engines cannot be trusted here, with an `EngineError`
that gives the exact command that rebuilds them. Nothing here imports TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from fssam_deploy.errors import ConfigError, EngineError
from fssam_deploy.manifest import Manifest
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.onnx.plugin_variant import PLUGIN_MANIFEST  # noqa: F401  (written there)
from fssam_deploy.stages import IMAGE_INPUTS, StageSpec

ENGINE_MANIFEST = "engines.json"
TRT_FORMAT = "fssam-tensorrt/1"
PRECISIONS = ("fp32", "fp16", "bf16")
ONNX_MANIFEST = "manifest.json"  # written by onnx.export
DYNAMIC_AXIS = "batch"  # the name export_onnx gives a dynamic batch axis


@dataclass(frozen=True)
class BuildSettings:
    """Everything a build was asked for; `command()` is the CLI call that repeats it exactly."""

    onnx_dir: str
    out_dir: str
    precision: str = "fp32"
    batch: tuple = (1, 1, 1)  # (min, opt, max) episodes per call
    timing_cache: str | None = None
    workspace_gib: float | None = None
    plugin: bool = True

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r}: choose one of {PRECISIONS}")
        b = tuple(self.batch)
        ints = len(b) == 3 and all(isinstance(x, int) and not isinstance(x, bool) for x in b)
        if not ints or not 1 <= b[0] <= b[1] <= b[2]:
            raise ConfigError(f"batch must be (min, opt, max) ints with 1 <= min <= opt <= max, got {self.batch!r}")
        object.__setattr__(self, "batch", b)
        if self.workspace_gib is not None and not self.workspace_gib > 0:
            raise ConfigError(f"workspace_gib must be > 0 (or None for TensorRT's default), got {self.workspace_gib}")

    def command(self) -> str:
        """`fssam build --format tensorrt ...` with these settings (paths as recorded)."""
        args = ["fssam", "build", "--format", "tensorrt", "--onnx-dir", self.onnx_dir, "--out", self.out_dir,
                "--precision", self.precision, "--batch", ",".join(str(x) for x in self.batch)]
        if self.timing_cache:
            args += ["--timing-cache", self.timing_cache]
        if self.workspace_gib is not None:
            args += ["--workspace", f"{self.workspace_gib:g}"]
        if not self.plugin:
            args.append("--no-plugin")
        return shlex.join(args)

    def to_dict(self) -> dict:
        return {**asdict(self), "batch": list(self.batch)}

    @classmethod
    def from_dict(cls, d: dict) -> BuildSettings:
        return cls(**{**d, "batch": tuple(d["batch"])})


# --------------------------------------------------------------------------------------- profiles


def batch_range(spec: StageSpec, batch: tuple, shots: int) -> tuple[int, int, int]:
    """(min, opt, max) of a stage's batch axis over the calls an episode of `batch` episodes makes.

    "M" (memory encodings): the support side B*K, the query side 2B, or both at once B*K + 2B.
    "B" of a stage that takes images (image encoder, DINOv2): one image per query (B) and the
    supports flattened (B*K). Any other "B": B. opt is the largest call at the opt batch.
    """
    lo, opt, hi = batch
    if spec.batch_axis == "M":
        mults = (shots, 2, shots + 2)
    elif spec.batch_axis == "B":
        mults = (1, shots) if set(spec.input_names) & IMAGE_INPUTS else (1,)
    else:
        raise EngineError(f"stage {spec.name!r}: batch axis {spec.batch_axis!r} has no profile rule "
                          "(known: 'B', 'M'); add one to backends.tensorrt.manifest.batch_range")
    return lo * min(mults), opt * max(mults), hi * max(mults)


def stage_profile(spec: StageSpec, inputs: list[dict], batch: tuple, shots: int) -> dict:
    """{input: {"min", "opt", "max"}} for the graph inputs `inputs` (ONNX manifest entries: name, shape).

    A dim named DYNAMIC_AXIS at index 0 takes `batch_range`; every other dim must be an int and is fixed.
    """
    rng = batch_range(spec, batch, shots)
    profile = {}
    for entry in inputs:
        shape = list(entry["shape"])
        odd = [(i, d) for i, d in enumerate(shape) if not isinstance(d, int) and not (i == 0 and d == DYNAMIC_AXIS)]
        if odd:
            raise EngineError(f"stage {spec.name!r}, input {entry['name']!r}: shape {shape} has symbolic dims {odd}; "
                              f"only a leading {DYNAMIC_AXIS!r} axis can be profiled; re-export the graphs")
        if shape and shape[0] == DYNAMIC_AXIS:
            profile[entry["name"]] = {k: [n, *shape[1:]] for k, n in zip(("min", "opt", "max"), rng)}
        else:
            profile[entry["name"]] = {k: shape for k in ("min", "opt", "max")}
    return profile


# ----------------------------------------------------------------------------------- timing cache


def timing_cache_key(platform: dict, precision: str, plugin_kernel_sha256: str | None) -> dict:
    """What a timing cache is valid for: GPU, compute capability, TensorRT, precision, plugin kernel.

    TensorRT keys cached tactic timings by layer, but an AOT plugin's timing-cache id is empty, so
    a changed kernel would reuse stale timings: its source hash is part of the key.
    """
    key = {"gpu": platform["gpu"], "capability": platform["capability"], "tensorrt": platform["tensorrt"],
           "precision": precision, "plugin_kernel_sha256": plugin_kernel_sha256}
    key["id"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return key


def _key_path(cache: str | Path) -> Path:
    return Path(f"{cache}.key.json")


def check_timing_cache(cache: str | Path, key: dict) -> None:
    """Refuse a timing cache made for another key (its sidecar `<cache>.key.json`); absent is fine."""
    cache, sidecar = Path(cache), _key_path(cache)
    if not cache.exists():
        return
    if not sidecar.is_file():
        raise EngineError(f"{cache}: timing cache of unknown origin (no {sidecar.name}); it may hold timings of "
                          f"another GPU, TensorRT or plugin kernel: delete it or pass another --timing-cache")
    old = json.loads(sidecar.read_text())
    if old.get("id") != key["id"]:
        diff = {k: (old.get(k), key[k]) for k in key if k != "id" and old.get(k) != key[k]}
        raise EngineError(f"{cache}: timing cache made for another build (cache vs now: {diff}); its timings "
                          f"would be wrong here: delete it or pass another --timing-cache")


def write_timing_cache_key(cache: str | Path, key: dict) -> None:
    _key_path(cache).write_text(json.dumps(key, indent=2))


# --------------------------------------------------------------------------------------- manifest


def current_platform(device=None) -> dict:
    """{"gpu", "capability", "tensorrt"} of this process: the CUDA device `device` and installed TensorRT."""
    import torch

    from fssam_deploy.errors import BackendUnavailableError

    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError("TensorRT engines need TensorRT: pip install tensorrt") from exc
    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT engines need a CUDA GPU; torch sees none")
    device = torch.device(device or "cuda")
    major, minor = torch.cuda.get_device_capability(device)
    return {"gpu": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}", "tensorrt": trt.__version__}


def build_manifest(cfg: FSSAMConfig, settings: BuildSettings, platform: dict, stages: dict, onnx_manifest: dict,
                   versions: dict, cache_key: dict | None) -> dict:
    """The engine folder's manifest; `stages` maps a stage to its entry (see `tensorrt_build.build_stage`)."""
    return {"format": TRT_FORMAT, "config": cfg.to_dict(), "shots": cfg.shots, "batch": list(settings.batch),
            "precision": settings.precision, "platform": platform, "build": settings.to_dict(),
            "rebuild": settings.command(), "timing_cache_key": cache_key, "weights": onnx_manifest.get("weights"),
            "onnx": {"opset": onnx_manifest.get("opset"), "batch": onnx_manifest.get("batch"),
                     "precision": onnx_manifest.get("precision")},
            "versions": versions, "stages": stages}


def onnx_graph_sha256(onnx_dir: Path, stage: str, plugin: bool) -> str | None:
    """The sha256 the ONNX folder's manifest records for a stage's graph (or its plugin variant)."""
    path = onnx_dir / (PLUGIN_MANIFEST if plugin else ONNX_MANIFEST)
    if not path.is_file():
        return None
    entry = json.loads(path.read_text()).get("stages", {}).get(stage)
    return entry.get("sha256") if entry else None


def _check_platform(path: Path, manifest: dict, here: dict) -> None:
    built, rebuild = manifest["platform"], manifest["rebuild"]
    if (built["gpu"], built["capability"]) != (here["gpu"], here["capability"]):
        raise EngineError(f"{path}: engines built on GPU {built['gpu']!r} (sm {built['capability']}), this is "
                          f"{here['gpu']!r} (sm {here['capability']}); TensorRT engines run only on the GPU model "
                          f"they were built on. Rebuild here: {rebuild}")
    if built["tensorrt"] != here["tensorrt"]:
        raise EngineError(f"{path}: engines built with TensorRT {built['tensorrt']}, this is TensorRT "
                          f"{here['tensorrt']}; an engine is tied to its TensorRT version. Rebuild: {rebuild}")


def _check_onnx(path: Path, manifest: dict) -> None:
    onnx_dir = Path(manifest["build"]["onnx_dir"])
    if not (onnx_dir / ONNX_MANIFEST).is_file():
        return  # the graphs are gone: the engines stand on their own
    for stage, entry in manifest["stages"].items():
        now = onnx_graph_sha256(onnx_dir, stage, entry["plugin"])
        if now != entry["onnx_sha256"]:
            raise EngineError(f"{path}: the ONNX graph of stage {stage!r} in {onnx_dir} changed since the engine was "
                              f"built (sha256 {entry['onnx_sha256'][:12]}... then, {str(now)[:12]}... now). "
                              f"Rebuild: {manifest['rebuild']}")


def read_trt_manifest(engine_dir: str | Path, expect_config: FSSAMConfig | None = None, here: dict | None = None,
                      check_onnx: bool = True) -> Manifest:
    """Read `engines.json` once and refuse stale engines.

    Raises EngineError when the manifest is missing or of another format, built for another config
    than `expect_config`, on another GPU / compute capability or TensorRT version than `here`
    (`current_platform()`; None skips the check), or from ONNX graphs that changed since
    (when the ONNX folder is still there). Engine files are checked per stage by `check_engine`.
    """
    engine_dir = Path(engine_dir)
    manifest = Manifest.read(engine_dir, TRT_FORMAT, f"build engines with `fssam build --format tensorrt --onnx-dir "
                             f"GRAPHS --out {engine_dir}`", filename=ENGINE_MANIFEST, what="TensorRT engine folder",
                             missing="no engine manifest")
    manifest.rebuild = f"rebuild: {manifest.get('rebuild', 'fssam build --format tensorrt')}"
    manifest.check_config(expect_config, "engines")
    if here is not None:
        _check_platform(manifest.path, manifest, here)
    if check_onnx:
        _check_onnx(manifest.path, manifest)
    return manifest


def check_engine(engine_dir: str | Path, manifest: Manifest, stage: str) -> Path:
    """The path of `stage`'s engine, after checking it is listed, present and unchanged (sha256)."""
    return manifest.artifact(stage, "engine")
