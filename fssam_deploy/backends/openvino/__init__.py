"""OpenVINO backends (CPU): the exported ONNX graphs as OpenVINO IR (`fssam build --format openvino`).

`openvino`: fp32 IR compiled with `INFERENCE_PRECISION_HINT` f32, set explicitly (on CPUs with AMX or
AVX512-BF16, OpenVINO's default is bf16). `openvino-bf16`: the same IR with the bf16 hint (native on AMX /
AVX512-BF16 CPUs; elsewhere OpenVINO ignores it and the episode's settings say so), the decoder compiled f32
(`runner.F32_UNDER_BF16`: its IoU head picks the mask). `openvino-int8`: DINOv2
quantized by NNCF on synthetic episodes (or `--calibration-dir` images); the image encoder stays fp32 by default
(its int8 form, with the ONNX path's fp32 cones, cost mask IoU: `quantize.QUANTIZED_STAGES`), every other op
f32. `openvino-int8-bf16`: the same int8 IR under the bf16 hint (decoder f32): int8 where NNCF quantized, bf16
for the rest (DINOv2's attention, the image and memory encoders), which is what OpenVINO itself would pick on an
AMX CPU; paper-config 1-shot episodes on an AMX Xeon measured 1.15-1.18x over `openvino-bf16` (README).
Nothing here imports OpenVINO until an IR folder is built or loaded.

Why plain OpenVINO and not ONNX Runtime's OpenVINO execution provider: `benchmarks/bench_openvino.py
--ep-python` measured it no faster (paper DINOv2 graph, AVX2 EPYC: provider 3704 ms, plain OpenVINO 3145 ms;
README); the provider runs the CPU plugin behind ONNX Runtime's session, needs its own onnxruntime build
(`onnxruntime-openvino` replaces `onnxruntime`) and gives no zero-copy output binding of its own.
"""

from __future__ import annotations

from pathlib import Path

from fssam_deploy.backends.openvino.manifest import OPENVINO_FORMAT
from fssam_deploy.backends.registry import Backend, BuildRequest, LoadRequest, register
from fssam_deploy.episode import Episode
from fssam_deploy.errors import ConfigError, EngineError

ENGINE_SOURCE = "fssam build --format openvino --onnx-dir GRAPHS"


def _build(req: BuildRequest) -> Path:
    """`fssam build --format openvino --onnx-dir GRAPHS --out OV [--precision fp32|bf16|int8] [--batch N]`."""
    from fssam_deploy.backends.openvino.build import build_openvino

    if req.source_dir is None:
        raise ConfigError("--format openvino needs --onnx-dir (fp32 graphs written by `fssam export`; "
                          "`--batch dynamic` graphs take any --batch here)")
    o = req.options
    return build_openvino(req.source_dir, req.out, precision=req.precision, batch=req.batch, force=req.force,
                          calibration_dir=o.get("calibration_dir"),
                          calibration_episodes=o.get("calibration_episodes", 8), seed=req.seed,
                          threads=o.get("threads"))


def _check_folder_precision(engine_dir: Path, built: str, wanted: str, name: str) -> None:
    """fp32 and bf16 IR are the same fp32 IR (bf16 is the runtime hint); int8 IR is its own."""
    if (built == "int8") != (wanted == "int8"):
        raise EngineError(f"{engine_dir}: {built} IR; --backend {name} needs "
                          f"{'int8' if wanted == 'int8' else 'fp32 (or bf16)'} IR: "
                          f"`fssam build --format openvino --onnx-dir GRAPHS --out DIR --precision {wanted}`")


def _load(precision: str, name: str, hint: str | None):
    """The loader of backend `name`: IR of `precision`, compiled with INFERENCE_PRECISION_HINT `hint` (None: the
    manifest's)."""

    def load(req: LoadRequest) -> Episode:
        from fssam_deploy.backends.openvino.build import build_openvino
        from fssam_deploy.backends.openvino.manifest import read_openvino_manifest
        from fssam_deploy.backends.openvino.runner import openvino_episode

        engine_dir = req.engine_dir
        if engine_dir is None:  # benchmarks / demo without --engine-dir: export the weights they run, then convert
            if req.workdir is None:
                raise ConfigError(f"--backend {name} needs --engine-dir (written by `{ENGINE_SOURCE}`)")
            from fssam_deploy.onnx.export import export_onnx

            graphs = export_onnx(req.cfg, req.workdir / "onnx", checkpoint=req.checkpoint, seed=req.seed,
                                 batch="dynamic", progress=False)
            engine_dir = build_openvino(graphs, req.workdir / f"openvino-{precision}", precision=precision,
                                        batch="dynamic", calibration_dir=req.options.get("calibration_dir"),
                                        calibration_episodes=req.options.get("calibration_episodes", 8),
                                        seed=req.seed, threads=req.threads)
        _check_folder_precision(Path(engine_dir), read_openvino_manifest(engine_dir).precision, precision, name)
        return openvino_episode(engine_dir, expect=req.cfg, threads=req.threads, precision_hint=hint)

    return load


_COMMON = {"family": "openvino", "devices": ("cpu",), "engine_format": OPENVINO_FORMAT, "build": _build}
_FLOAT_IR = ("fp32", "bf16")  # bf16 is a runtime hint over the same fp32 IR (`_check_folder_precision`)
for _b in (
    Backend("openvino", summary="OpenVINO IR from the ONNX graphs, fp32 (INFERENCE_PRECISION_HINT f32)",
            load=_load("fp32", "openvino", "f32"), requires=("openvino",), extra="openvino",
            engine_source=ENGINE_SOURCE, build_format="openvino", loads=_FLOAT_IR, **_COMMON),
    Backend("openvino-bf16", summary="OpenVINO fp32 IR under INFERENCE_PRECISION_HINT bf16 (AMX / AVX512-BF16 "
            "CPUs; f32 elsewhere), decoder f32", load=_load("bf16", "openvino-bf16", "bf16"), requires=("openvino",),
            extra="openvino",
            engine_source=f"{ENGINE_SOURCE} --precision bf16", precision="bf16", accuracy="fast",
            loads=_FLOAT_IR, **_COMMON),
    Backend("openvino-int8", summary="OpenVINO IR, DINOv2 int8 (NNCF post-training, attention "
            "kept fp32)", load=_load("int8", "openvino-int8", None), requires=("openvino", "nncf"),
            extra="openvino", engine_source=f"{ENGINE_SOURCE} --precision int8", precision="int8", accuracy="fast",
            **_COMMON),
    Backend("openvino-int8-bf16", summary="OpenVINO int8 IR under INFERENCE_PRECISION_HINT bf16: DINOv2 int8, "
            "the rest bf16 (AMX / AVX512-BF16 CPUs; f32 elsewhere), decoder f32",
            load=_load("int8", "openvino-int8-bf16", "bf16"), requires=("openvino", "nncf"), extra="openvino",
            engine_source=f"{ENGINE_SOURCE} --precision int8", precision="int8", accuracy="fast", **_COMMON),
):
    register(_b)
