"""ONNX Runtime backends: the exported graphs (`fssam export`), one session per stage, IO binding on torch tensors.

`onnxruntime`: the fp32 (or fp16) graphs as exported. `onnxruntime-int8`: the image encoder and DINOv2
quantized (`onnx.quantize`), from the fp32 graphs of `--engine-dir` (or an int8 folder itself).
"""

from __future__ import annotations

from pathlib import Path

from fssam_deploy.backends.onnxruntime.runner import OnnxRuntimeRunner
from fssam_deploy.backends.registry import Backend, LoadRequest, register
from fssam_deploy.episode import Episode
from fssam_deploy.errors import EngineError
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.onnx.export import ONNX_FORMAT, export_onnx, read_manifest
from fssam_deploy.stages import STAGE_SPECS


def onnx_episode(engine_dir: str | Path, expect: FSSAMConfig | None = None, device="cpu", threads: int | None = None,
                 emulate_bf16: bool = False) -> Episode:
    """The episode over the ONNX graphs of `engine_dir`, one ONNX Runtime session per stage.

    `expect`: refuse graphs exported for another config. `device`: where tensors live ("cuda" uses the CUDA /
    TensorRT execution providers when installed). `threads`: intra-op threads. `emulate_bf16`: run bf16 graphs
    (made for TensorRT) as their fp32 emulation, for accuracy checks.
    """
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir, expect)
    precision = manifest.precision
    if precision == "bf16" and not emulate_bf16:
        raise EngineError(f"{engine_dir}: bf16 graphs are for TensorRT (`fssam build --format tensorrt "
                          "--precision bf16`); ONNX Runtime has no bf16 CPU kernels. Check their accuracy with "
                          "`fssam verify` (it runs them emulated); export fp32 or fp16 graphs for ONNX Runtime")
    cfg = manifest.config
    runners = {}
    for name, spec in STAGE_SPECS.items():
        shape_fn = lambda b, spec=spec: {t.name: t.concrete(cfg, b, cfg.shots) for t in spec.outputs}  # noqa: E731
        runners[name] = OnnxRuntimeRunner(manifest.artifact(name, "graph"), spec, shape_fn, device, threads,
                                          precision)
    episode = Episode(runners, cfg, device)
    episode.manifest = manifest
    episode.settings = {"engine_dir": str(engine_dir), "precision": precision,
                        "providers": runners["decoder"].session.get_providers(),
                        "quantized": {k: e["quantized"] for k, e in manifest["stages"].items() if "quantized" in e}}
    if str(device).startswith("cpu"):  # where ONNX Runtime runs the int8 graphs with MLAS
        warn_if_saturating(engine_dir, episode.settings["quantized"])
    return episode


def warn_if_saturating(engine_dir: Path, quantized: dict) -> None:
    """qint8 weights on a CPU without VNNI: ONNX Runtime's u8 x s8 kernels saturate (`onnx.quantize`)."""
    from fssam_deploy.hostinfo import host_summary, int8_dot_saturates

    signed = sorted(k for k, q in quantized.items() if q.get("weight_type") == "qint8")
    if signed and int8_dot_saturates():
        import warnings

        warnings.warn(f"{engine_dir}: stages {signed} have qint8 weights, whose int8 dot product saturates on "
                      f"{host_summary()} (no VNNI / AMX-INT8): masks can be far from fp32 (IoU 0.04 measured). "
                      f"Quantize on this CPU (`fssam export --precision int8` picks quint8 here)", stacklevel=3)


def _load(int8: bool):
    def load(req: LoadRequest) -> Episode:
        engine_dir = req.engine_dir
        if engine_dir is None:  # benchmarks / demo without --engine-dir: export the weights they run
            engine_dir = export_onnx(req.cfg, req.workdir / "graphs", req.checkpoint, req.seed, batch="dynamic",
                                     progress=False)
        if int8 and read_manifest(engine_dir).precision != "int8":
            if req.workdir is None:
                raise EngineError(f"{engine_dir}: fp32 graphs; --backend onnxruntime-int8 needs int8 graphs: "
                                  "`fssam export --precision int8 --out DIR` (benchmarks quantize a copy themselves)")
            from fssam_deploy.onnx.quantize import quantize_engine_dir

            engine_dir = quantize_engine_dir(engine_dir, req.workdir / "int8")
        return onnx_episode(engine_dir, expect=req.cfg, device=req.device, threads=req.threads)

    return load


register(Backend("onnxruntime", "onnxruntime", "ONNX Runtime over the exported graphs (fp32 or fp16)", _load(False),
                 requires=("onnxruntime", "onnx"), extra="onnx", engine_format=ONNX_FORMAT,
                 engine_source="fssam export", demo=("cpu", "cuda"), loads=("fp32", "fp16")))
register(Backend("onnxruntime-int8", "onnxruntime", "ONNX Runtime, image encoder and DINOv2 int8 (dynamic "
                 "quantization, fp32 cones for the high-res features)", _load(True), devices=("cpu",),
                 requires=("onnxruntime", "onnx"), extra="onnx", engine_format=ONNX_FORMAT,
                 engine_source="fssam export --precision int8", precision="int8", accuracy="fast"))

__all__ = ["onnx_episode"]
