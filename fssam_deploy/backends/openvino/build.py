"""`fssam build --format openvino`: the fp32 ONNX graphs of an export folder as OpenVINO IR, with a manifest.

Per stage: `openvino.convert_model(<stage>.onnx)`, reshaped to a static batch when asked, saved with
`openvino.save_model(..., compress_to_fp16=False)` (weights stay fp32: precision is the runtime's choice).
`--precision bf16` writes the same fp32 IR and records `INFERENCE_PRECISION_HINT` bf16 for the runner;
`--precision int8` quantizes DINOv2 (`quantize.QUANTIZED_STAGES`) with NNCF (`openvino.quantize`).
All of it is written into a temporary sibling folder swapped in at the end (`artifacts.atomic_dir`).
"""

from __future__ import annotations

import json
from pathlib import Path

from fssam_deploy.atomic import atomic_dir
from fssam_deploy.backends.openvino.manifest import PRECISIONS, build_manifest
from fssam_deploy.backends.openvino.runner import import_openvino
from fssam_deploy.errors import ConfigError, EngineError
from fssam_deploy.manifest import MANIFEST, Manifest
from fssam_deploy.model.checkpoint import file_sha256
from fssam_deploy.onnx.export import read_manifest
from fssam_deploy.stages import STAGE_SPECS


def parse_batch(batch: str | int, source: Manifest) -> str:
    """"dynamic" (keep the graphs' dynamic batch) or a static batch "N"; static graphs take only their own."""
    text = str(batch)
    if text != "dynamic" and not (text.isdigit() and int(text) >= 1):
        raise ConfigError(f"--batch {batch!r}: give a positive int (a static batch) or 'dynamic'")
    if source["batch"] != "dynamic" and text != str(source["batch"]):
        raise ConfigError(f"{source.folder}: graphs exported with a static batch {source['batch']}; --batch {text} "
                          "needs graphs exported with `fssam export --batch dynamic`")
    return text


def ir_entry(xml: Path, source_entry: dict, spec, batch: str) -> dict:
    """A stage's manifest entry: its files' sha256, I/O as the IR has them, and its source graph's sha256."""
    bin_file = xml.with_suffix(".bin")
    size = None if batch == "dynamic" else int(batch)
    io = {kind: [{**t, "shape": [size or "batch", *t["shape"][1:]] if t["shape"][0] == "batch" else t["shape"]}
                 for t in source_entry[kind]] for kind in ("inputs", "outputs")}
    return {"file": xml.name, "sha256": file_sha256(xml), "data_files": {bin_file.name: file_sha256(bin_file)},
            **io, "source": {k: source_entry[k] for k in ("file", "sha256", "data_files") if k in source_entry}}


def convert_stage(onnx_path: Path, xml: Path, batch: str) -> None:
    """ONNX graph -> IR at `xml` (+ .bin), fp32 weights; a static `batch` fixes every input's first axis."""
    ov = import_openvino()
    model = ov.convert_model(str(onnx_path))
    if batch != "dynamic":
        model.reshape({port.get_any_name(): [int(batch), *list(port.get_partial_shape())[1:]] for port in model.inputs})
    ov.save_model(model, str(xml), compress_to_fp16=False)


def build_openvino(onnx_dir: str | Path, out_dir: str | Path, precision: str = "fp32", batch: str | int = "dynamic",
                   force: bool = False, calibration_dir: str | Path | None = None, calibration_episodes: int = 8,
                   seed: int = 0, threads: int | None = None) -> Path:
    """Write an OpenVINO IR folder at `out_dir` from the fp32 ONNX folder `onnx_dir` (`fssam export`).

    precision: "fp32", "bf16" (fp32 IR, bf16 inference hint) or "int8" (NNCF post-training quantization of
    `quantize.QUANTIZED_STAGES`, calibrated on `calibration_episodes` synthetic episodes from `seed`, or on the
    images of `calibration_dir`). batch: "dynamic" or a static int. Returns `out_dir`.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: the openvino format takes {list(PRECISIONS)}")
    onnx_dir = Path(onnx_dir)
    source = read_manifest(onnx_dir)  # every graph checked against its sha256
    if source.precision != "fp32":
        raise EngineError(f"{source.path}: graphs of precision {source.precision!r}; OpenVINO IR is converted from "
                          f"fp32 graphs (`fssam export --precision fp32`) and applies bf16 / int8 itself "
                          f"(`--precision bf16|int8` here)")
    batch = parse_batch(batch, source)
    cfg = source.config
    with atomic_dir(out_dir, force=force, protect=[onnx_dir]) as tmp:
        for name in STAGE_SPECS:
            convert_stage(onnx_dir / source["stages"][name]["file"], tmp / f"{name}.xml", batch)
        quantization = None
        if precision == "int8":
            from fssam_deploy.backends.openvino.quantize import quantize_folder

            quantization = quantize_folder(tmp, cfg, calibration_dir=calibration_dir, episodes=calibration_episodes,
                                           seed=seed, threads=threads)
        entries = {name: ir_entry(tmp / f"{name}.xml", source["stages"][name], spec, batch)
                   for name, spec in STAGE_SPECS.items()}
        for name, settings in (quantization or {}).get("stages", {}).items():
            entries[name]["quantized"] = settings
        manifest = build_manifest(cfg, entries, precision, batch, source, quantization)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return Path(out_dir)
