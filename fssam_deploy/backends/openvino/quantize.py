"""int8 OpenVINO IR: NNCF post-training quantization of DINOv2 (and, when asked, the image encoder), calibrated
on what the episode actually feeds them.

Calibration data: the fp32 IR of the folder being built runs `episodes` synthetic episodes
(`synthetic.episode_tensors`) while every quantized stage's inputs are recorded (the supports and the query, as
the episode batches them), or, with `calibration_dir`, the user's images resized to the model size. NNCF then
quantizes each stage (`nncf.quantize`, transformer model type: SmoothQuant on the linear layers) with an
`ignored_scope` that keeps fp32 what the ONNX int8 path keeps fp32 (`onnx.quantize.FP32_CONES`: the Hiera
layers behind the high-resolution features `feat_s0` / `feat_s1`, which place the mask edges) and, unless
`activation_matmuls`, the attention's activation-by-activation MatMuls.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fssam_deploy.backends.base import Runner
from fssam_deploy.backends.openvino.runner import OpenVinoRunner, compile_config, import_openvino
from fssam_deploy.episode import Episode
from fssam_deploy.errors import ConfigError, EngineError, InputError
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.onnx.quantize import FP32_CONES
from fssam_deploy.stages import STAGE_SPECS

# DINOv2 only by default. Tiny config, random weights, the 2 synthetic test episodes, mask IoU vs fp32: int8
# DINOv2 alone 0.9998; int8 image encoder alone (fp32 cones kept) 0.924 (NNCF's static activation ranges; the
# ONNX path's dynamic per-call ranges do better there). `quantize_folder(stages=...)` quantizes both.
QUANTIZED_STAGES = ("dino_features",)
WEIGHT_OPS = ("MatMul", "Convolution")  # what NNCF quantizes that has a weight


class Recorder(Runner):
    """A runner that keeps a copy of every feed it is given (as numpy) and passes it on to `inner`."""

    def __init__(self, inner: Runner):
        super().__init__()
        self.inner, self.spec, self.name = inner, inner.spec, f"record:{inner.name}"
        self.feeds: list[dict[str, np.ndarray]] = []

    def activate_impl(self) -> None:
        self.inner.activate()
        self.input_shapes, self.prunable_inputs = self.inner.input_shapes, self.inner.prunable_inputs

    def deactivate_impl(self) -> None:
        self.inner.deactivate()

    def infer_impl(self, feed):
        self.feeds.append({k: v.detach().cpu().numpy().copy() for k, v in feed.items()})
        return self.inner.infer(feed)


def episode_feeds(folder: Path, cfg: FSSAMConfig, stages, episodes: int, seed: int,
                  threads: int | None) -> dict[str, list[dict]]:
    """{stage: feeds} recorded while the fp32 IR in `folder` runs `episodes` synthetic episodes (seeds
    `seed`, `seed` + 1, ...; the batch is the IR's when it is static)."""
    from fssam_deploy.synthetic import episode_tensors

    if episodes < 1:
        raise ConfigError(f"calibration needs at least one episode, got {episodes}")
    config = compile_config("f32", threads)
    runners: dict[str, Runner] = {name: OpenVinoRunner(folder / f"{name}.xml", spec, cfg, config)
                                  for name, spec in STAGE_SPECS.items()}
    for name in stages:
        runners[name] = Recorder(runners[name])
    with Episode(runners, cfg, "cpu") as episode:
        static = runners["decoder"].input_shapes["feat"][0]
        for i in range(episodes):
            query, supports, masks = episode_tensors(cfg, static or 1, cfg.shots, seed + i)
            episode.segment(query, supports, masks)
    return {name: runners[name].feeds for name in stages}


def image_feeds(calibration_dir: str | Path, cfg: FSSAMConfig, batch: int | None) -> list[dict]:
    """{"images": (N, 3, S, S)} feeds from the images of `calibration_dir`, N = the static batch (or 1)."""
    from fssam_deploy.imageio import image_to_tensor, list_images, read_image

    paths = list_images([str(calibration_dir)])
    n = batch or 1
    if len(paths) < n:
        raise InputError(f"--calibration-dir {calibration_dir}: {len(paths)} images, the IR's static batch needs "
                         f"at least {n}")
    images = torch.stack([image_to_tensor(read_image(p), cfg.image_size) for p in paths])  # (N, 3, S, S)
    return [{"images": images[i : i + n].numpy()} for i in range(0, len(paths) - n + 1, n)]


def ancestors(model, outputs) -> set[str]:
    """Friendly names of every node the graph outputs `outputs` depend on."""
    seen, todo = set(), [model.output(o).get_node() for o in outputs]
    while todo:
        node = todo.pop()
        if node.get_friendly_name() in seen:
            continue
        seen.add(node.get_friendly_name())
        todo.extend(i.get_source_output().get_node() for i in node.inputs())
    return seen


def activation_matmuls(model) -> list[str]:
    """The attention's activation-by-activation products: MatMuls with no constant operand, and the
    ScaledDotProductAttention ops OpenVINO's ONNX frontend fuses attention into."""
    def const(node):  # a weight, possibly behind a Convert
        while node.get_type_name() == "Convert":
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    return [n.get_friendly_name() for n in model.get_ops() if n.get_type_name() == "ScaledDotProductAttention"
            or (n.get_type_name() == "MatMul" and not any(const(i.get_source_output().get_node()) for i in n.inputs()))]


def kept_fp32(model, stage: str, keep_activation_matmuls: bool) -> list[str]:
    """The quantizable nodes of `stage` that stay fp32: its FP32_CONES, plus the activation MatMuls."""
    cone = ancestors(model, FP32_CONES.get(stage, ()))
    names = {n.get_friendly_name() for n in model.get_ops() if n.get_type_name() in WEIGHT_OPS} & cone
    if keep_activation_matmuls:
        names |= set(activation_matmuls(model))
    return sorted(names)


def quantize_model(model, feeds: list[dict], ignored: list[str], preset: str = "performance"):
    """`nncf.quantize` of an OpenVINO model on `feeds` (every feed used), keeping `ignored` nodes fp32."""
    import logging

    import nncf

    nncf.set_log_level(logging.WARNING)  # NNCF logs every node it skips (INFO)
    if not feeds:
        raise EngineError("int8 calibration recorded no inputs; the episode never ran the stage")
    presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
    return nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds), preset=presets[preset],
                         model_type=nncf.ModelType.TRANSFORMER,
                         ignored_scope=nncf.IgnoredScope(names=ignored, validate=False))


def save_replacing(ov, model, xml: Path) -> None:
    """Save `model` as `xml` (+ .bin) over the IR it was read from: OpenVINO maps the old .bin into memory, and
    writing into a mapped file crashes the process (SIGBUS), so write new files and rename them over."""
    new = xml.with_name(f".{xml.stem}.int8.xml")
    ov.save_model(model, str(new), compress_to_fp16=False)
    new.with_suffix(".bin").replace(xml.with_suffix(".bin"))
    new.replace(xml)


def quantize_folder(folder: Path, cfg: FSSAMConfig, stages=QUANTIZED_STAGES, calibration_dir=None,
                    episodes: int = 8, seed: int = 0, threads: int | None = None,
                    activation_matmuls_fp32: bool = True) -> dict:
    """Rewrite the `stages` IR of `folder` (fp32, every stage present) in int8; returns the manifest's
    "quantization" record ({"calibration", "stages": {stage: settings}})."""
    ov = import_openvino()
    import nncf

    core = ov.Core()
    if calibration_dir is not None:
        static = core.read_model(str(folder / f"{stages[0]}.xml")).inputs[0].get_partial_shape()[0]
        feeds = image_feeds(calibration_dir, cfg, None if static.is_dynamic else static.get_length())
        per_stage = {name: feeds for name in stages}
        calibration = {"data": f"images of {Path(calibration_dir).resolve()}", "feeds": len(feeds)}
    else:
        per_stage = episode_feeds(folder, cfg, stages, episodes, seed, threads)
        calibration = {"data": "synthetic episodes", "episodes": episodes, "seed": seed}
    out = {"calibration": calibration, "stages": {}}
    for name in stages:
        xml = folder / f"{name}.xml"
        model = core.read_model(str(xml))
        ignored = kept_fp32(model, name, activation_matmuls_fp32)
        quantized = quantize_model(model, per_stage[name], ignored)
        save_replacing(ov, quantized, xml)
        del model
        fq = sum(1 for n in quantized.get_ops() if n.get_type_name() == "FakeQuantize")
        if fq == 0:
            raise EngineError(f"{xml}: NNCF quantized no op of stage {name!r}")
        out["stages"][name] = {"method": "nncf.quantize", "nncf": nncf.__version__, "preset": "performance",
                               "model_type": "transformer", "fake_quantize_ops": fq, "nodes_kept_fp32": len(ignored),
                               "fp32_cone_of": list(FP32_CONES.get(name, ())),
                               "activation_matmuls_fp32": activation_matmuls_fp32,
                               "calibration_feeds": len(per_stage[name])}
    return out
