"""The manifest of an AOTInductor package folder: what was compiled, for what, and the staleness checks.

A `.pt2` package is native code for one torch build and one device: a CPU package holds C++
compiled for the vector ISA of the machine that built it, a CUDA package holds kernels for one
GPU architecture. `manifest.json` records all of it, and `read_aoti_manifest` refuses a folder
whose packages cannot be trusted here, with an `EngineError` that says to rebuild.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fssam_deploy.backends.inductor import FAITHFUL
from fssam_deploy.errors import EngineError
from fssam_deploy.hostinfo import cpu_name
from fssam_deploy.manifest import MANIFEST, Manifest, weights_id  # noqa: F401
from fssam_deploy.model.config import FSSAMConfig

AOTI_FORMAT = "fssam-aoti/1"
REBUILD = "rebuild with `fssam build --format aoti`"


def _cpu_isa() -> str | None:
    """The vector ISA Inductor compiles CPU code for on this machine (e.g. 'avx2'), if it can tell."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        return str(pick_vec_isa()) or None
    except Exception:  # private API: absent or failing on some builds
        return None


def device_info(device: str | torch.device) -> dict:
    """{"type", "name", ...}: GPU name and compute capability on CUDA, CPU model and vector ISA on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}"}
    if device.type == "cpu":
        return {"type": "cpu", "name": cpu_name(), "isa": _cpu_isa()}
    return {"type": device.type, "name": str(device)}


def build_manifest(cfg: FSSAMConfig, entries: dict, device: dict, batch: int, weights: str) -> dict:
    """The manifest of a package folder whose stages are `entries` ({stage: entry})."""
    return {"format": AOTI_FORMAT, "config": cfg.to_dict(), "shots": cfg.shots, "batch": batch,
            "stages": entries, "device": device, "weights": weights, "inductor": dict(FAITHFUL),
            "versions": {"torch": torch.__version__}}


def _settings(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(settings.items())) or "Inductor's defaults"


def _check_device(path: Path, built: dict, device: torch.device) -> None:
    if built["type"] != device.type:
        raise EngineError(f"{path}: packages built for device type {built['type']!r}, asked to run on "
                          f"{device.type!r}; AOTInductor code runs only where it was compiled: {REBUILD} "
                          f"--device {device.type}")
    here = device_info(device)
    if device.type == "cuda" and (built["name"], built.get("capability")) != (here["name"], here["capability"]):
        raise EngineError(f"{path}: packages built on GPU {built['name']!r} (sm {built.get('capability')}), this "
                          f"is {here['name']!r} (sm {here['capability']}); their kernels were tuned and compiled "
                          f"for that GPU: {REBUILD} on this machine")
    if device.type == "cpu" and built.get("isa") and here.get("isa") and built["isa"] != here["isa"]:
        raise EngineError(f"{path}: packages compiled for the {built['isa']} vector ISA, this CPU uses "
                          f"{here['isa']}: {REBUILD} on this machine")


def read_aoti_manifest(package_dir: str | Path, expect_config: FSSAMConfig | None = None,
                       device: str | torch.device | None = None) -> Manifest:
    """Read `manifest.json` once and refuse stale packages.

    Raises EngineError when the manifest is missing or not an AOTI manifest, when it was built for
    another config than `expect_config`, by another torch version or with other Inductor settings
    (`FAITHFUL`), or for another device type / GPU (name and compute capability) / CPU vector ISA
    than `device` (default: the built one).
    Package hashes are checked per stage when a runner asks for its file (`Manifest.artifact`).
    """
    package_dir = Path(package_dir)
    manifest = Manifest.read(package_dir, AOTI_FORMAT, f"rebuild with `fssam build --format aoti --out {package_dir}`",
                             what="AOTInductor package folder")
    manifest.check_config(expect_config, "packages")
    built_torch = manifest["versions"]["torch"]
    if built_torch != torch.__version__:
        raise EngineError(f"{manifest.path}: packages built with torch {built_torch}, this is torch "
                          f"{torch.__version__}; AOTInductor packages are tied to the torch build: {REBUILD}")
    built_with = manifest.get("inductor") or {}
    if built_with != FAITHFUL:  # e.g. packages from before the memory's bf16 rounding was kept
        raise EngineError(f"{manifest.path}: packages compiled with {_settings(built_with)}, this version compiles "
                          f"with {_settings(FAITHFUL)} (`fssam_deploy/backends/inductor.py`: without it Inductor "
                          f"drops the memory's bf16 rounding): {REBUILD}")
    _check_device(manifest.path, manifest["device"], torch.device(device or manifest["device"]["type"]))
    return manifest
