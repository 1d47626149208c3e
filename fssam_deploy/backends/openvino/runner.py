"""OpenVINO runner: one stage's IR compiled for the CPU, inputs and outputs bound over torch buffers (no copies).

`OpenVinoRunner` compiles `<stage>.xml` with `PERFORMANCE_HINT` LATENCY, `INFERENCE_NUM_THREADS` and an explicit
`INFERENCE_PRECISION_HINT` (f32 for `exact`: on CPUs with AMX / AVX512-BF16 OpenVINO's default is bf16), and
records what the compiled model reports it computes in (`compiled_precision`: a bf16 hint on a CPU without
native bf16 is ignored and reads f32). `infer` wraps each input's memory in an `ov.Tensor(..., shared_memory=True)`
and gives the request preallocated torch outputs the same way, so OpenVINO reads and writes torch's buffers.
`openvino_episode(folder)` is the `Episode` over every stage of a checked IR folder; under the bf16 hint the
stages of `F32_UNDER_BF16` are compiled f32. A model compiled in f32 has its bf16 round trips (the memory
encoder's) rewritten into an exact f32 rounding first (`rounding.exact_bf16_rounding`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fssam_deploy.backends.base import Runner
from fssam_deploy.backends.openvino.manifest import read_openvino_manifest
from fssam_deploy.backends.openvino.rounding import exact_bf16_rounding
from fssam_deploy.episode import Episode
from fssam_deploy.errors import BackendUnavailableError, EngineError
from fssam_deploy.hostinfo import openvino_capabilities
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.stages import STAGE_SPECS

PRECISION_HINTS = ("f32", "bf16")
# Stages compiled with the f32 hint when the episode asks for bf16. The decoder's IoU head picks one of its
# masks, and bf16 rounding of near-tied scores picks another: measured with PyTorch bf16 autocast at the tiny
# config (random weights), every stage in bf16 gave mask IoU 0.152 against fp32, every stage but the decoder
# 0.991. The decoder is a few percent of an episode; the half ONNX graphs keep its IoU head in fp32 likewise.
F32_UNDER_BF16 = ("decoder",)


def import_openvino():
    """The `openvino` module, or a BackendUnavailableError that says how to install it."""
    try:
        import openvino
    except ImportError as exc:
        raise BackendUnavailableError("the openvino backends need OpenVINO: pip install 'fssam-deploy[openvino]' "
                                      "(or pip install openvino)") from exc
    return openvino


def compile_config(precision_hint: str = "f32", threads: int | None = None) -> dict:
    """The CPU plugin properties every OpenVINO runner compiles with (recorded in the episode's settings)."""
    if precision_hint not in PRECISION_HINTS:
        raise EngineError(f"INFERENCE_PRECISION_HINT {precision_hint!r}: choose from {list(PRECISION_HINTS)}")
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision_hint}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


class OpenVinoRunner(Runner):
    """One stage's IR: `with OpenVinoRunner(xml, spec, cfg) as r: r.infer({name: float32 CPU tensor})`.

    `config`: `compile_config(...)`. Outputs are torch tensors allocated per call, written by OpenVINO in place.
    """

    def __init__(self, path: str | Path, spec, cfg: FSSAMConfig, config: dict | None = None):
        super().__init__()
        self.path, self.spec, self.cfg, self.name = Path(path), spec, cfg, f"openvino:{spec.name}"
        self.config = dict(config or compile_config())
        self.compiled = self.request = None
        self.compiled_precision: str | None = None
        self.rounding_rewrites = 0  # bf16 round trips made exact in f32 (`rounding.exact_bf16_rounding`)

    def activate_impl(self) -> None:
        ov = import_openvino()
        if not self.path.is_file():
            raise EngineError(f"{self.path}: OpenVINO IR of stage {self.spec.name!r} not found")
        core = ov.Core()
        model = core.read_model(str(self.path))
        native_bf16 = "BF16" in (openvino_capabilities() or ())
        if self.config.get("INFERENCE_PRECISION_HINT") == "f32" or not native_bf16:  # compiled in f32
            self.rounding_rewrites = exact_bf16_rounding(model)
        self.compiled = core.compile_model(model, "CPU", self.config)
        self.request = self.compiled.create_infer_request()
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type: "f32", "bf16"
        self.compiled_precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        inputs = {}
        for port in self.compiled.inputs:
            name = next((n for n in port.get_names() if n in self.spec.input_names), port.get_any_name())
            inputs[name] = tuple(None if d.is_dynamic else d.get_length() for d in port.get_partial_shape())
        self.input_shapes = inputs
        self.prunable_inputs = frozenset(self.spec.input_names) - set(inputs)
        self._outputs = {t.name: self.compiled.output(t.name) for t in self.spec.outputs}

    def deactivate_impl(self) -> None:
        self.compiled = self.request = None

    def infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import openvino as ov

        # the numpy views must outlive infer(): OpenVINO reads the torch buffers themselves
        feed = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in feed.items()}
        for k, v in feed.items():
            self.request.set_tensor(k, ov.Tensor(v.numpy(), shared_memory=True))
        batch = next(iter(feed.values())).shape[0]
        outs = {t.name: torch.empty(t.concrete(self.cfg, batch, self.cfg.shots), dtype=torch.float32)
                for t in self.spec.outputs}
        for k, v in outs.items():
            self.request.set_tensor(self._outputs[k], ov.Tensor(v.numpy(), shared_memory=True))
        self.request.infer()
        return outs


def openvino_episode(folder: str | Path, expect: FSSAMConfig | None = None, threads: int | None = None,
                     precision_hint: str | None = None) -> Episode:
    """The episode over the IR folder `folder` (`fssam build --format openvino`), one compiled model per stage.

    `expect`: refuse IR built for another config. `threads`: INFERENCE_NUM_THREADS (None: OpenVINO's default,
    every core). `precision_hint`: override the manifest's INFERENCE_PRECISION_HINT ("f32" or "bf16").
    """
    folder = Path(folder)
    m = read_openvino_manifest(folder, expect)
    cfg = m.config
    hint = precision_hint or m.get("inference_precision", "f32")
    config = compile_config(hint, threads)
    hints = {name: "f32" if name in F32_UNDER_BF16 else hint for name in STAGE_SPECS}
    runners = {name: OpenVinoRunner(m.artifact(name, "IR"), spec, cfg, compile_config(hints[name], threads))
               for name, spec in STAGE_SPECS.items()}
    episode = Episode(runners, cfg, "cpu")
    episode.manifest = m
    compiled = {name: r.compiled_precision for name, r in runners.items()}
    episode.settings = {"engine_dir": str(folder), "precision": m.precision, "compile_config": config,
                        "stage_precision_hint": hints, "compiled_precision": compiled, "batch": m["batch"],
                        "exact_bf16_rounding": {n: r.rounding_rewrites for n, r in runners.items()
                                                if r.rounding_rewrites},
                        "quantized": {k: e["quantized"] for k, e in m["stages"].items() if "quantized" in e}}
    if hint == "bf16":
        asked = {compiled[n] for n, h in hints.items() if h == "bf16"}
        episode.settings["note"] = (f"the {', '.join(F32_UNDER_BF16)} kept f32 (its IoU head picks the mask)" +
                                    ("" if asked == {"bf16"} else
                                     f"; INFERENCE_PRECISION_HINT bf16 requested, the compiled models report "
                                     f"{sorted(asked)}: this CPU has no native bf16, OpenVINO runs f32"))
    return episode
