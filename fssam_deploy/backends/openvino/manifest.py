"""The manifest of an OpenVINO IR folder (`fssam build --format openvino`) and its staleness checks.

`manifest.json` (format `fssam-openvino/1`) records the config, the precision (and the
`INFERENCE_PRECISION_HINT` the runner compiles with), the batch, the CPU (model, ISA features,
OpenVINO's optimization capabilities), the OpenVINO (and NNCF) version, the sha256 of every
source ONNX graph and of every file written. `read_openvino_manifest` refuses a folder built for
another config, by another OpenVINO, on another CPU, whose files changed, or whose source ONNX
folder has been re-exported since, with an `EngineError` ending in the command that rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

from fssam_deploy.errors import EngineError
from fssam_deploy.hostinfo import cpu_info, openvino_capabilities
from fssam_deploy.manifest import MANIFEST, Manifest
from fssam_deploy.model.checkpoint import file_sha256
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.stages import STAGE_SPECS

OPENVINO_FORMAT = "fssam-openvino/1"
PRECISIONS = ("fp32", "bf16", "int8")
# what the CPU plugin computes the float ops in, per build precision (int8: the ops NNCF left float)
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def rebuild_command(folder: str | Path, source: str | None = None, precision: str = "fp32") -> str:
    """The command that writes a good folder at `folder`."""
    onnx_dir = source or "GRAPHS"
    return (f"rebuild it with `fssam build --format openvino --onnx-dir {onnx_dir} --out {folder} "
            f"--precision {precision}`")


def openvino_version() -> str:
    import openvino

    return openvino.__version__


def host_device() -> dict:
    """{"type": "cpu", "name", "features", "openvino_capabilities"}: the CPU this folder is built on."""
    info = cpu_info()
    return {"type": "cpu", "name": info["model"], "features": info["features"],
            "openvino_capabilities": list(openvino_capabilities() or ())}


def build_manifest(cfg: FSSAMConfig, entries: dict, precision: str, batch: str, source: Manifest,
                   quantization: dict | None = None) -> dict:
    """The manifest of a folder whose stages are `entries` ({stage: entry with file, sha256, data_files})."""
    versions = {"openvino": openvino_version()}
    if quantization is not None:
        import nncf

        versions["nncf"] = nncf.__version__
    data = {"format": OPENVINO_FORMAT, "config": cfg.to_dict(), "shots": cfg.shots, "batch": batch,
            "precision": precision, "inference_precision": INFERENCE_PRECISION[precision],
            "stages": entries, "device": host_device(), "weights": source.get("weights"),
            "source": {"dir": str(source.folder.resolve()), "format": source["format"],
                       "precision": source.precision, "manifest_sha256": file_sha256(source.path)},
            "versions": versions}
    if quantization is not None:
        data["quantization"] = quantization
    return data


def _check_versions(m: Manifest) -> None:
    built, here = m["versions"].get("openvino"), openvino_version()
    if built != here:
        raise EngineError(f"{m.path}: built with OpenVINO {built}, this is OpenVINO {here}; the IR and its "
                          f"recorded behaviour belong to that release: {m.rebuild}")


def _check_device(m: Manifest) -> None:
    built, here = m["device"], host_device()
    if built.get("name") != here["name"]:
        raise EngineError(f"{m.path}: built on CPU {built.get('name')!r}, this is {here['name']!r}; precision and "
                          f"int8 choices were measured on that CPU: {m.rebuild} on this machine")
    diff = sorted(f for f in set(built.get("features", {})) | set(here["features"])
                  if built.get("features", {}).get(f) != here["features"].get(f))
    if diff:
        raise EngineError(f"{m.path}: built on a CPU whose ISA features differ from this one's in {diff} (built: "
                          f"{[f for f in diff if built['features'].get(f)]} present); {m.rebuild} on this machine")


def _check_source(m: Manifest) -> None:
    """The source ONNX folder, if it is still there, must be the one the IR was converted from."""
    src = m.get("source", {})
    path = Path(src.get("dir", "")) / MANIFEST
    if src.get("dir") and path.is_file() and file_sha256(path) != src.get("manifest_sha256"):
        raise EngineError(f"{m.path}: its source graphs in {src['dir']} were exported again after this build "
                          f"({path} changed); {m.rebuild}")


def read_openvino_manifest(folder: str | Path, expect: FSSAMConfig | None = None) -> Manifest:
    """The folder's manifest, checked: format, config (`expect`), every stage, OpenVINO version, CPU model and
    ISA features, source graphs unchanged. Each stage's files are checked (sha256) by `Manifest.artifact`."""
    folder = Path(folder)
    # before the manifest is read the folder's precision is unknown: the command names every choice
    m = Manifest.read(folder, OPENVINO_FORMAT, rebuild_command(folder, precision="fp32|bf16|int8"),
                      what="OpenVINO IR folder (`fssam build --format openvino`)")
    m.rebuild = rebuild_command(folder, m.get("source", {}).get("dir"), m.precision)
    for key in ("versions", "device", "precision"):
        if key not in m:
            raise EngineError(f"{m.path}: manifest has no {key!r}; {m.rebuild}")
    if m.precision not in PRECISIONS:
        raise EngineError(f"{m.path}: precision {m.precision!r} is not one of {list(PRECISIONS)}; {m.rebuild}")
    m.check_config(expect, "IR")
    m.check_stages(STAGE_SPECS)
    _check_versions(m)
    _check_device(m)
    _check_source(m)
    return m
