"""int8 engine dirs: an fp32 engine dir (`fssam export`) with its big encoders quantized by ONNX Runtime.

`quantize_engine_dir` copies every graph of the source dir and rewrites the chosen ones in int8,
then writes the manifest (precision "int8", per stage how it was quantized, new sha256s, the fp32
manifest's sha256); all in a temporary sibling folder renamed at the end, like `export_onnx`.

The weight type follows the CPU that quantizes (`auto_weight_type`): qint8 with VNNI / AMX-INT8, quint8 without,
where ONNX Runtime's u8 x s8 kernels saturate. Graphs quantized qint8 warn when loaded on a CPU without VNNI.

Methods (benchmarks/bench_int8.py on this project's 2-core AMD EPYC, AVX512-VNNI, ONNX Runtime 1.32,
random weights; episode speedup over fp32 ORT and min mask IoU against it):
  - "dynamic" (default): weights int8 per output channel, activations quantized per tensor at run
    time (`quantize_dynamic`: MatMulInteger + DynamicQuantizeLinear, which ONNX Runtime fuses into
    DynamicQuantizeMatMul). The exporter writes every Linear as Gemm, which the dynamic quantizer
    skips, so each Gemm with constant weights becomes MatMul + Add first. Paper config 1.69-1.73x,
    IoU 0.987-0.989; tiny config 1.47-1.49x, IoU 0.989 (DINOv2 ViT-S at 560 px spends 43% of its
    time in the attention's fp32 MatMuls and softmax, which int8 does not touch).
  - "static": QDQ with activation ranges calibrated (MinMax) on synthetic episodes' images, after
    `quant_pre_process`; Gemm outputs stay float (QGemm). As fast or slightly slower than "dynamic"
    (paper 1.63-1.69x, tiny 1.49-1.50x) and no more accurate (IoU 0.987-0.989), and it needs
    calibration data: selectable, not the default.
Both keep fp32 the attention's activation-by-activation MatMuls (dynamic-quantizing them was no
faster; in QDQ they pull the softmax into a QLinearSoftmax, slower than fp32) and `FP32_CONES`.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from fssam_deploy.atomic import atomic_dir
from fssam_deploy.errors import ConfigError, EngineError
from fssam_deploy.model.checkpoint import file_sha256
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.onnx.export import MANIFEST, check_graph, export_onnx, read_manifest
from fssam_deploy.stages import STAGE_SPECS
from fssam_deploy.synthetic import episode_tensors

METHODS = ("dynamic", "static")
DEFAULT_METHOD = "dynamic"
WEIGHT_TYPES = ("auto", "qint8", "quint8")  # auto: qint8 where the int8 dot product cannot saturate, else quint8
PRECISION = "int8"
# op types that only a quantized graph holds (QOperator, QDQ, and ONNX Runtime's fused forms)
INTEGER_OPS = frozenset({
    "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear",
    "QLinearMatMul", "QLinearConv", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
    "QLinearAdd", "QLinearMul", "QLinearSoftmax",
})
# Graph outputs whose whole ancestry stays fp32. SAM 2's stride-4 and stride-8 features (Hiera stages 1
# and 2, then conv_s0 / conv_s1) go straight into the mask decoder's upscaling and place the mask's
# edges. Keeping those 13 of Hiera-T's 51 linear layers fp32 raised the min mask IoU against fp32 from
# 0.980 to 0.989 (tiny config, 6 episodes) for 31 -> 36 ms of int8 image encoder (fp32: 57 ms).
FP32_CONES = {"image_encoder": ("feat_s0", "feat_s1")}
EPISODE_INPUTS = ("query", "supports", "support_masks")  # graph inputs fed straight from an episode


def default_stages(manifest: dict) -> list[str]:
    """The SAM 2 image encoder and DINOv2: `dino_features` when the engine dir has it, else `prior`."""
    dino = "dino_features" if "dino_features" in manifest["stages"] else "prior"
    return ["image_encoder", dino]


def integer_ops(path: str | Path) -> dict[str, int]:
    """{op type: count} of the integer (quantized) ops in the ONNX graph at `path`."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(sorted(Counter(n.op_type for n in model.graph.node if n.op_type in INTEGER_OPS).items()))


def quantize_engine_dir(src_dir: str | Path, dst_dir: str | Path, stages: list[str] | None = None,
                        method: str = DEFAULT_METHOD, weight_type: str = "auto", per_channel: bool = True,
                        fp32_cones: dict[str, tuple[str, ...]] | None = None, calibration_images: int = 8,
                        seed: int = 0, force: bool = False) -> Path:
    """Write a complete engine dir at `dst_dir`: the fp32 graphs of `src_dir`, the `stages` ones in int8.

    stages: None means `default_stages` (the big encoders). method: "dynamic" or "static" (see the
    module docstring). weight_type: "qint8", "quint8" or "auto" (`auto_weight_type`). fp32_cones:
    {stage: graph outputs} whose ancestor nodes stay fp32; None means `FP32_CONES`, {} quantizes everything.
    calibration_images: generated images (synthetic episodes from `seed`) that calibrate "static". Returns `dst_dir`; on
    any failure nothing is left at `dst_dir`'s parent but what was there before.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    settings = quant_settings(method, weight_type, per_channel, calibration_images, seed)
    cones = FP32_CONES if fp32_cones is None else fp32_cones
    manifest = read_source(src_dir)
    names = list(stages) if stages is not None else default_stages(manifest)
    check_stage_names(src_dir, manifest, names)
    check_fp32_graphs(src_dir, manifest, names)
    if dst_dir.resolve() == src_dir.resolve():
        raise ConfigError(f"{dst_dir}: the int8 engine dir must differ from its fp32 source dir")
    with atomic_dir(dst_dir, force=force) as tmp:
        cfg = FSSAMConfig.from_dict(manifest["config"])
        out = json.loads(json.dumps(manifest.data))  # a deep copy to update
        for name, entry in manifest["stages"].items():
            if name in names:
                stage_settings = {**settings, "fp32_cone_of": list(cones.get(name, ()))}
                out["stages"][name] = quantize_stage(src_dir / entry["file"], tmp / entry["file"], name, entry,
                                                     cfg, stage_settings)
            else:
                for f in graph_files(src_dir / entry["file"]):
                    shutil.copy2(f, tmp / f.name)
        (tmp / MANIFEST).write_text(json.dumps(int8_manifest(out, src_dir), indent=2))
    return dst_dir


def export_int8(cfg: FSSAMConfig, out_dir: str | Path, checkpoint=None, seed: int = 0, opset: int = 18,
                batch: str = "1", stages: list[str] | None = None, method: str = DEFAULT_METHOD,
                progress: bool = True, force: bool = False, **quantize_options) -> Path:
    """`fssam export --precision int8`: export the fp32 graphs (`export_onnx`) and `quantize_engine_dir` them,
    both inside the one atomic folder that becomes `out_dir` (a killed run leaves only a temporary folder the
    next one cleans). `stages` are the stages to quantize (None: the big encoders); every stage is exported."""
    with atomic_dir(out_dir, force=force) as work:
        fp32 = export_onnx(cfg, work / "fp32", checkpoint=checkpoint, seed=seed, opset=opset, batch=batch,
                           precision="fp32", progress=progress)
        int8 = quantize_engine_dir(fp32, work / "int8", stages=stages, method=method, **quantize_options)
        for f in int8.iterdir():
            f.rename(work / f.name)
        shutil.rmtree(fp32)
        int8.rmdir()
    return Path(out_dir)


def graph_files(path: Path) -> list[Path]:
    """The graph file and the external-data files it names (none for graphs saved inline)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
             for e in t.external_data if e.key == "location"}
    return [path, *(path.parent / n for n in sorted(names))]


def auto_weight_type() -> tuple[str, str]:
    """(weight type, why) for this CPU. ONNX Runtime's u8 x s8 kernels (qint8 weights) are the fast path where
    the CPU has VNNI / AMX-INT8; without them (AVX2, AVX-512 without VNNI) they sum u8*s8 pairs in int16 and
    saturate: measured on an AVX2-only AMD EPYC, tiny config, qint8 gave the image encoder's `feat` an error
    of 21% of its scale and episode mask IoU 0.04-0.07 against fp32, quint8 (u8 x u8, no saturation) 1.6% and
    the same speed (137 vs 174 ms fp32). ORT's other remedy, 7-bit weights (reduce_range), measured 2.3%."""
    from fssam_deploy.hostinfo import host_summary, int8_dot_saturates

    if int8_dot_saturates():
        return "quint8", f"quint8: no VNNI / AMX-INT8 on {host_summary()}, where qint8 (u8 x s8) saturates"
    return "qint8", f"qint8: {host_summary()} has VNNI / AMX-INT8 (u8 x s8 accumulates in int32)"


def quant_settings(method: str, weight_type: str, per_channel: bool, calibration_images: int, seed: int) -> dict:
    if method not in METHODS:
        raise ConfigError(f"quantization method {method!r}: choose from {list(METHODS)}")
    if weight_type not in WEIGHT_TYPES:
        raise ConfigError(f"weight type {weight_type!r}: choose from {list(WEIGHT_TYPES)}")
    settings = {"method": method, "weight_type": weight_type, "per_channel": per_channel}
    if weight_type == "auto":
        settings["weight_type"], settings["weight_type_auto"] = auto_weight_type()
    if method == "dynamic":
        return {**settings, "op_types": ["MatMul"], "gemm_as_matmul": True, "matmul_const_b_only": True,
                "preprocess": False}
    if calibration_images < 1:
        raise ConfigError(f"static quantization needs calibration images, got calibration_images={calibration_images}")
    return {**settings, "op_types": ["Gemm", "MatMul"], "matmul_const_b_only": True, "preprocess": True,
            "activation_type": "quint8", "calibration": {"method": "MinMax", "images": calibration_images,
                                                         "data": "synthetic episodes", "seed": seed}}


def read_source(src_dir: Path) -> dict:
    if not (src_dir / MANIFEST).is_file():
        raise EngineError(f"{src_dir}: not an engine dir (no {MANIFEST}); quantize the output of "
                          f"`fssam export --out {src_dir}`")
    return read_manifest(src_dir)


def check_stage_names(src_dir: Path, manifest: dict, names: list[str]) -> None:
    unknown = sorted(set(names) - set(manifest["stages"]))
    if unknown or not names:
        raise ConfigError(f"stages to quantize {unknown or names}: {src_dir / MANIFEST} has stages "
                          f"{list(manifest['stages'])}")


def check_fp32_graphs(src_dir: Path, manifest: dict, names: list[str]) -> None:
    """The source must be fp32 and hold no integer ops (`read_manifest` has checked every graph's sha256)."""
    if manifest.get("precision") != "fp32":
        raise EngineError(f"{src_dir / MANIFEST}: precision is {manifest.get('precision')!r}; int8 graphs are "
                          f"made from an fp32 engine dir (`fssam export --precision fp32`)")
    for name in names:
        found = integer_ops(src_dir / manifest["stages"][name]["file"])
        if found:
            raise EngineError(f"{src_dir / manifest['stages'][name]['file']}: stage {name!r} is already quantized "
                              f"(integer ops {found}); quantize an fp32 export")


def quantize_stage(src: Path, dst: Path, name: str, entry: dict, cfg: FSSAMConfig, settings: dict) -> dict:
    """Quantize one graph; returns its manifest entry (new sha256 and nodes, `quantized` settings)."""
    import onnx

    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=dst.parent) as work:
        fp32 = Path(work) / "fp32.onnx"
        model = prepared_model(src, fp32, settings)
        exclude = fp32_cone(model, settings["fp32_cone_of"], src)
        if settings["matmul_const_b_only"]:  # the QDQ quantizer ignores ONNX Runtime's MatMulConstBOnly option
            exclude = sorted(set(exclude) | set(activation_matmuls(model)))
        onnx.save(model, str(fp32))
        if settings["method"] == "dynamic":
            quantize_dynamic_graph(fp32, dst, settings, exclude)
        else:
            calib = settings["calibration"]
            feeds = calibration_feeds(name, entry, cfg, calib["images"], calib["seed"])
            quantize_static_graph(fp32, dst, settings, exclude, feeds)
    check_graph(dst)
    found = integer_ops(dst)
    if not found:
        raise EngineError(f"{dst}: no op of stage {name!r} was quantized ({settings['method']}, op types "
                          f"{settings['op_types']}); the graph has no MatMul/Gemm with constant weights")
    nodes = len(onnx.load(str(dst), load_external_data=False).graph.node)
    return {**entry, "nodes": nodes, "sha256": file_sha256(dst),
            "quantized": {**settings, "integer_ops": found, "nodes_kept_fp32": len(exclude),
                          "fp32_sha256": entry["sha256"]}}


def prepared_model(src: Path, scratch: Path, settings: dict):
    """The fp32 graph the quantizer reads: ONNX Runtime's `quant_pre_process` (its graph optimisation and
    ONNX shape inference, written to `scratch`) when settings ask for it, then Gemm as MatMul when asked."""
    import onnx

    if settings["preprocess"]:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        with _quiet():  # ONNX Runtime's symbolic shape inference gives up on dynamic-batch graphs: ONNX's only
            quant_pre_process(str(src), str(scratch), skip_symbolic_shape=True)
        src = scratch
    model = onnx.load(str(src))
    if settings.get("gemm_as_matmul"):
        gemm_as_matmul(model)
    return model


def gemm_as_matmul(model) -> int:
    """Rewrite every Gemm(x, W, b) with constant W (alpha = beta = 1, transA = 0) as MatMul(x, W') + Add(b),
    W' = W transposed when transB; returns how many were rewritten. The dynamic quantizer skips Gemm."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes, count = [], 0
    for n in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if n.op_type != "Gemm" or not plain or n.input[1] not in inits:
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        w = np.ascontiguousarray(w.T) if attrs.get("transB", 0) else w
        w_name = f"{n.input[1]}_as_matmul_{count}"
        model.graph.initializer.append(numpy_helper.from_array(w, w_name))
        has_bias = len(n.input) > 2 and n.input[2]
        mm_out = f"{n.output[0]}_matmul" if has_bias else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], w_name], [mm_out], name=f"{n.name}_matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=f"{n.name}_bias"))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return count


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}[name]


def fp32_cone(model, outputs, path: Path) -> list[str]:
    """Names of the nodes `outputs` depend on (every node gets a name first: the quantizers exclude by name)."""
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    producer = {o: n for n in model.graph.node for o in n.output}
    missing = [o for o in outputs if o not in producer]
    if missing:
        have = [o.name for o in model.graph.output]
        raise EngineError(f"{path}: no graph output {missing} to keep fp32; the graph's outputs are {have}")
    cone, todo = set(), list(outputs)
    while todo:
        node = producer.get(todo.pop())
        if node is not None and node.name not in cone:
            cone.add(node.name)
            todo.extend(node.input)
    return sorted(cone)


def activation_matmuls(model) -> list[str]:
    """Names of the MatMuls whose B is computed (the attention's), not a weight: they stay fp32."""
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in consts]


def quantize_dynamic_graph(src: Path, dst: Path, settings: dict, exclude: list[str]) -> None:
    from onnxruntime.quantization import quantize_dynamic

    with _quiet():
        quantize_dynamic(src, dst, weight_type=_quant_type(settings["weight_type"]), nodes_to_exclude=exclude,
                         per_channel=settings["per_channel"], op_types_to_quantize=settings["op_types"],
                         extra_options={"MatMulConstBOnly": settings["matmul_const_b_only"]})


def quantize_static_graph(src: Path, dst: Path, settings: dict, exclude: list[str], feeds: list[dict]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    with _quiet():
        quantize_static(src, dst, ListReader(feeds), quant_format=QuantFormat.QDQ, nodes_to_exclude=exclude,
                        op_types_to_quantize=settings["op_types"], per_channel=settings["per_channel"],
                        activation_type=_quant_type(settings["activation_type"]),
                        weight_type=_quant_type(settings["weight_type"]), calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"MatMulConstBOnly": settings["matmul_const_b_only"],
                                       "OpTypesToExcludeOutputQuantization": settings["op_types"]})


class ListReader:
    """`CalibrationDataReader` over a list of feeds."""

    def __init__(self, feeds: list[dict]):
        self._it = iter(feeds)

    def get_next(self) -> dict | None:
        return next(self._it, None)


def calibration_feeds(name: str, entry: dict, cfg: FSSAMConfig, count: int, seed: int) -> list[dict]:
    """`count` feeds for the graph of stage `name`: images and masks from synthetic episodes (seeds `seed`,
    `seed` + 1, ...), other inputs from the stage spec's dummy inputs; shapes from the manifest entry
    (a dynamic batch calibrates with 1)."""
    import torch


    feeds = []
    for i in range(count):
        q, sx, sy = episode_tensors(cfg, 1, cfg.shots, seed + i)  # (1, 3, S, S), (1, K, 3, S, S), (1, K, S, S)
        pool = torch.cat([q, sx.flatten(0, 1)])  # every image of the episode, query first
        feed = {}
        for t in entry["inputs"]:
            shape = [1 if d == "batch" else d for d in t["shape"]]
            if t["name"] == "images":
                x = pool[torch.arange(shape[0]) % pool.shape[0]]
            elif t["name"] in EPISODE_INPUTS:
                x = dict(zip(EPISODE_INPUTS, (q, sx, sy)))[t["name"]]
                x = x.expand(shape[0], *x.shape[1:])
            elif name in STAGE_SPECS and t["name"] in STAGE_SPECS[name].input_names:
                x = STAGE_SPECS[name].dummy_inputs(cfg, shape[0], cfg.shots, seed + i)[t["name"]]
            else:
                raise EngineError(f"stage {name!r}: no calibration data for input {t['name']!r} {t['shape']}")
            if list(x.shape) != shape:
                raise EngineError(f"stage {name!r}: calibration input {t['name']!r} has shape {list(x.shape)}, "
                                  f"the manifest says {t['shape']}")
            feed[t["name"]] = x.contiguous().numpy()
        feeds.append(feed)
    return feeds


def int8_manifest(manifest: dict, src_dir: Path) -> dict:
    import onnxruntime

    manifest["precision"] = PRECISION
    manifest["source"] = {"precision": "fp32", "manifest_sha256": file_sha256(src_dir / MANIFEST)}
    manifest["versions"] = {**manifest.get("versions", {}), "onnxruntime": onnxruntime.__version__}
    return manifest


class _quiet:
    """ONNX Runtime's quantizers log every node (INFO) and advice (WARNING) through `logging`: mute them."""

    def __enter__(self):
        self._was = logging.root.manager.disable
        logging.disable(max(self._was, logging.WARNING))

    def __exit__(self, *exc):
        logging.disable(self._was)
