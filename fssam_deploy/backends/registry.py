"""The one registry of backends: every consumer (CLI, bench, demo, verify, eval, serve) reads it.

A backend module (`backends/<name>.py` or `backends/<name>/__init__.py`) calls `register(Backend(...))`
at import; `backends/__init__.py` imports every such module once (`pkgutil` discovery), so adding a
backend is adding its folder. A backend module imports its heavy library (onnxruntime, openvino,
tensorrt) only inside `load` / `build`, so reading the registry costs nothing.

`open_backend(name, cfg, ...)` returns an `episode.Episode`: the one orchestration, over the runners
that backend builds. `Backend.load(LoadRequest) -> Episode`; `Backend.build(BuildRequest) -> Path`
writes its artifact folder (ONNX graphs, AOTI packages, engines) where the backend has one.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fssam_deploy import backends
from fssam_deploy.errors import BackendUnavailableError, ConfigError
from fssam_deploy.model.config import FSSAMConfig

ACCURACY_CLASSES = ("exact", "fast")  # exact: fp32, mask IoU >= 0.999 vs PyTorch fp32; fast: IoU >= 0.98


@dataclass
class LoadRequest:
    """What a backend's `load` gets. `engine_dir`: its artifacts, or None. `workdir`: a temporary folder (the
    episode's) where the backend may build what `engine_dir` lacks (everything, when it is None) from
    `checkpoint` / `seed`; None: it may build nothing and refuses instead. `weights`: an `FSSAMWeights` the
    caller already holds (shared across backends), else the loader makes them (`model.checkpoint.make_weights`)."""

    cfg: FSSAMConfig
    device: torch.device
    engine_dir: Path | None = None
    checkpoint: str | None = None
    sam2_checkpoint: str | None = None
    dino_checkpoint: str | None = None
    seed: int = 0
    weights: object | None = None
    threads: int | None = None
    workdir: Path | None = None
    options: dict = field(default_factory=dict)  # backend-specific extras (e.g. {"calibration_dir": ...})

    @property
    def has_checkpoint(self) -> bool:
        return bool(self.checkpoint or self.sam2_checkpoint or self.dino_checkpoint)


@dataclass
class BuildRequest:
    """What a backend's `build` gets: the model (checkpoint or random `seed`), or `source_dir` (the ONNX
    graphs an engine is built from), the output folder and the build knobs."""

    cfg: FSSAMConfig
    out: Path
    device: torch.device
    checkpoint: str | None = None
    seed: int = 0
    source_dir: Path | None = None
    precision: str = "fp32"
    batch: str = "1"
    progress: bool = True
    force: bool = False
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Backend:
    """One registered backend.

    name: what `--backend` / `--backends` take. family: the folder it lives in. summary: one line of help.
    load: LoadRequest -> Episode. devices: device types it runs on. requires: modules it imports (checked
    with find_spec, never imported here); requires_on: (device type, modules) needed on that type only; extra:
    the pip extra that installs them. engine_format: the manifest `format` of its `--engine-dir` (None: it needs
    none). build / build_format: how `fssam build
    --format NAME` writes its artifacts (None: nothing to build). precision / accuracy: what it computes in,
    and its accuracy class ("exact" or "fast"). demo: device types on which `fssam demo` runs it. tune: those
    on which `fssam tune` measures it by default. loads: the artifact precisions it loads (`--backend auto`).
    jit: it compiles on its first call (torch.compile), so the first episode after loading is slow.
    """

    name: str
    family: str
    summary: str
    load: Callable
    devices: tuple[str, ...] = ("cpu", "cuda")
    requires: tuple[str, ...] = ()
    requires_on: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (device type, modules) needed on that type only
    extra: str | None = None
    engine_format: str | None = None
    engine_source: str | None = None  # the command that writes its --engine-dir
    build: Callable | None = None
    build_format: str | None = None
    precision: str = "fp32"
    accuracy: str = "exact"
    demo: tuple[str, ...] = ()  # device types on which `fssam demo` runs it
    tune: tuple[str, ...] = ("cpu", "cuda")  # device types on which `fssam tune` measures it unless --backends says
    loads: tuple[str, ...] | None = None  # `precision`s of the --engine-dir folders it loads (None: its own)
    jit: bool = False

    def loads_precision(self, folder_precision: str) -> bool:
        """Whether this backend runs a folder whose manifest says `precision: folder_precision`."""
        return folder_precision in (self.loads or (self.precision,))

    def unavailable(self, device: str | torch.device) -> str | None:
        """Why this backend cannot run on `device` here (None: it can)."""
        dev = torch.device(device)
        if dev.type not in self.devices:
            return f"backend {self.name!r} runs on {' or '.join(self.devices)} only (got --device {dev})"
        if dev.type == "cuda" and not torch.cuda.is_available():
            return f"--device {dev}: no CUDA device on this machine (torch.cuda.is_available() is False)"
        needed = (*self.requires, *(m for t, mods in self.requires_on if t == dev.type for m in mods))
        missing = [m for m in needed if importlib.util.find_spec(m) is None]
        if missing:
            how = f"pip install 'fssam-deploy[{self.extra}]'" if self.extra else f"pip install {' '.join(missing)}"
            return f"backend {self.name!r} needs {', '.join(missing)}: {how}"
        return None

    def check(self, device: str | torch.device) -> None:
        reason = self.unavailable(device)
        if reason:
            raise BackendUnavailableError(reason)


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    if backend.accuracy not in ACCURACY_CLASSES:
        raise ConfigError(f"backend {backend.name!r}: accuracy {backend.accuracy!r} not in {ACCURACY_CLASSES}")
    if backend.name in _REGISTRY and _REGISTRY[backend.name] != backend:
        raise ConfigError(f"backend {backend.name!r} registered twice ({_REGISTRY[backend.name].family}, "
                          f"{backend.family})")
    _REGISTRY[backend.name] = backend
    return backend


def _registry() -> dict[str, Backend]:
    backends.discover()  # imports every backend module once; each registers itself
    return _REGISTRY


def names(device: str | torch.device | None = None, available_only: bool = False, demo: bool = False) -> list[str]:
    """Registered names in registration order; `device`: those that run on its type; `available_only`:
    those whose packages are installed too; `demo`: those `fssam demo` runs on that device type."""
    out = []
    dev_type = torch.device(device).type if device is not None else None
    for name, b in _registry().items():
        if dev_type is not None and dev_type not in b.devices:
            continue
        if demo and dev_type not in b.demo:
            continue
        if available_only and b.unavailable(device or "cpu"):
            continue
        out.append(name)
    return out


def get(name: str) -> Backend:
    reg = _registry()
    if name not in reg:
        raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(reg)}")
    return reg[name]


def build_formats() -> dict[str, Backend]:
    """`fssam build --format` choices: format name -> the backend that builds it (the first registered)."""
    out: dict[str, Backend] = {}
    for b in _registry().values():
        if b.build_format and b.build_format not in out:
            out[b.build_format] = b
    return out


def by_engine_format(fmt: str) -> list[Backend]:
    """Backends that load a folder whose manifest says `format: fmt`."""
    return [b for b in _registry().values() if b.engine_format == fmt]


def open_backend(name: str, cfg: FSSAMConfig, *, device: str | torch.device = "cpu", engine_dir=None,
                 checkpoint=None, sam2_checkpoint=None, dino_checkpoint=None, seed: int = 0, weights=None,
                 threads: int | None = None, build_missing: bool = False, **options):
    """The `Episode` of backend `name` for `cfg` on `device`.

    `engine_dir`: its artifacts (graphs, packages, engines). `build_missing` (benchmarks, demo): the backend may
    build what it lacks (all of it without `engine_dir`, or an int8 copy of fp32 graphs) into a temporary folder
    that the episode owns and removes on `close()`; otherwise a backend that needs artifacts refuses with the
    command that builds them.
    """
    backend = get(name)
    backend.check(device)
    dev = torch.device(device)
    if engine_dir is None and backend.engine_format is not None and not build_missing:
        raise ConfigError(f"--backend {name} needs --engine-dir (written by `{backend.engine_source}`)")
    tmp = tempfile.TemporaryDirectory(prefix=f"fssam-{name}-") if build_missing else None
    req = LoadRequest(cfg=cfg, device=dev, engine_dir=Path(engine_dir) if engine_dir else None,
                      checkpoint=checkpoint, sam2_checkpoint=sam2_checkpoint, dino_checkpoint=dino_checkpoint,
                      seed=seed, weights=weights, threads=threads, workdir=Path(tmp.name) if tmp else None,
                      options=options)
    try:
        episode = backend.load(req)
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        raise
    episode.name = name
    if tmp is not None:
        episode.owned_dirs.append(tmp)
    return episode
