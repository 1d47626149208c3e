"""TensorRT backends: one engine per stage built from the exported ONNX graphs (`fssam build --format tensorrt`).

`tensorrt`: the engines, every tensor kept on the GPU; `tensorrt-graph`: the same with the query side
replayed as one CUDA graph. Written to TensorRT 10.9+ / 11's documented API; nothing here imports
TensorRT until an engine is built or loaded.
"""

from __future__ import annotations

from pathlib import Path

from fssam_deploy.backends.registry import Backend, BuildRequest, LoadRequest, register
from fssam_deploy.backends.tensorrt.episode import tensorrt_episode
from fssam_deploy.backends.tensorrt.manifest import TRT_FORMAT
from fssam_deploy.episode import Episode
from fssam_deploy.errors import ConfigError

BENCH_BATCH = (1, 1, 8)  # the batch range of engines built for a benchmark


def parse_batch(text: str) -> tuple[int, int, int]:
    """`--batch N` or `min,opt,max` -> (min, opt, max)."""
    try:
        batch = tuple(int(x) for x in str(text).split(","))
    except ValueError:
        raise ConfigError(f"--batch {text!r}: give one size or min,opt,max (integers)") from None
    if len(batch) == 1:
        batch = batch * 3
    if len(batch) != 3 or not 1 <= batch[0] <= batch[1] <= batch[2]:
        raise ConfigError(f"--batch {text!r}: give one size or min,opt,max with 1 <= min <= opt <= max")
    return batch


ENGINE_PRECISIONS = ("fp32", "fp16", "bf16")  # one backend runs engines of each


def _build(req: BuildRequest) -> Path:
    """`fssam build --format tensorrt --onnx-dir GRAPHS`: engines for this GPU."""
    from fssam_deploy.backends.tensorrt.build import build_tensorrt

    if req.source_dir is None:
        raise ConfigError("--format tensorrt needs --onnx-dir (graphs written by `fssam export`)")
    o = req.options
    return build_tensorrt(req.source_dir, req.out, precision=req.precision, batch=parse_batch(req.batch),
                          timing_cache=o.get("timing_cache"), workspace_gib=o.get("workspace"),
                          plugin=not o.get("no_plugin", False), progress=req.progress, force=req.force)


def bench_engines(req: LoadRequest) -> Path:
    """Export the request's weights to dynamic-batch ONNX with plugin variants and build fp32 engines (benchmarks)."""
    from fssam_deploy.backends.tensorrt.build import build_tensorrt
    from fssam_deploy.onnx.export import export_onnx
    from fssam_deploy.onnx.plugin_variant import export_plugin_variants

    graphs = export_onnx(req.cfg, req.workdir / "graphs", checkpoint=req.checkpoint, seed=req.seed, batch="dynamic",
                         progress=False)
    export_plugin_variants(req.cfg, graphs, checkpoint=req.checkpoint, seed=req.seed)
    return build_tensorrt(graphs, req.workdir / "engines", batch=BENCH_BATCH, progress=False)


def _load(cuda_graph: bool):
    def load(req: LoadRequest) -> Episode:
        engine_dir = req.engine_dir or bench_engines(req)
        return tensorrt_episode(engine_dir, expect=req.cfg, device=req.device, cuda_graph=cuda_graph)

    return load


for _b in (
    Backend("tensorrt", "tensorrt", "TensorRT engines (strongly typed, fused-attention plugin)", _load(False),
            devices=("cuda",), requires=("tensorrt",), extra="tensorrt", engine_format=TRT_FORMAT,
            loads=ENGINE_PRECISIONS,
            engine_source="fssam build --format tensorrt", build=_build, build_format="tensorrt", demo=("cuda",)),
    Backend("tensorrt-graph", "tensorrt", "TensorRT engines, the query side as one CUDA graph", _load(True),
            devices=("cuda",), requires=("tensorrt",), extra="tensorrt", engine_format=TRT_FORMAT,
            loads=ENGINE_PRECISIONS,
            engine_source="fssam build --format tensorrt", build=_build),
):
    register(_b)
