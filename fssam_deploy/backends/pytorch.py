"""PyTorch backends: the stage modules themselves under the runner contract, eager or compiled, fp32 or bf16.

`torch_runners(stages, cfg)` is what `model.Pipeline` runs; the registered backends are the same runners
with a precision (bf16 autocast, the reference's own precision), an attention kernel (the fused Triton
op) or torch.compile applied per stage.
"""

from __future__ import annotations

import contextlib

import torch

from fssam_deploy.backends.base import Runner
from fssam_deploy.backends.registry import Backend, LoadRequest, register
from fssam_deploy.episode import Episode
from fssam_deploy.model.checkpoint import make_weights
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.model.fssam import build_stages
from fssam_deploy.stages import STAGE_SPECS, stage_module


class TorchRunner(Runner):
    """A stage nn.Module under the runner contract (`input_shapes`: None for any size).

    `autocast`: a dtype to run the module under `torch.autocast` (on the inputs' device type); its outputs
    are then in that dtype, and the next stage takes them as they are (as the reference's autocast does).
    """

    input_dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def __init__(self, module: torch.nn.Module, spec, input_shapes: dict[str, tuple],
                 autocast: torch.dtype | None = None):
        super().__init__()
        self.module, self.spec, self.name = module, spec, f"torch:{spec.name}"
        self.input_shapes = input_shapes
        self.autocast = autocast

    def infer_impl(self, feed):
        args = [feed[n] for n in self.spec.input_names]
        ctx = (torch.autocast(args[0].device.type, dtype=self.autocast) if self.autocast is not None
               else contextlib.nullcontext())
        with torch.inference_mode(), ctx:
            outs = self.module(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return dict(zip(self.spec.output_names, outs))


def torch_runners(stages, cfg: FSSAMConfig, autocast: torch.dtype | None = None) -> dict[str, TorchRunner]:
    """The PyTorch stage modules of `stages` (`model.build_stages`) as runners keyed by stage name.

    Batch and shots are free (None); every other axis is checked against the spec.
    """
    free = {"B", "M", "K"}
    runners = {}
    for name, spec in STAGE_SPECS.items():
        shapes = {t.name: tuple(None if d in free else n for d, n in zip(t.shape, t.concrete(cfg, 1, 1)))
                  for t in spec.inputs}
        runners[name] = TorchRunner(stage_module(stages, name), spec, shapes, autocast)
    return runners


def compiled_forward(forward, mode: str | None):
    """torch.compile of a stage's forward. Under CUDA graphs ("reduce-overhead") a stage's outputs live in
    the graph's static buffers, overwritten by its next replay (the image encoder runs on the supports,
    then the query): they are cloned on the way out."""
    compiled = torch.compile(forward, dynamic=False, mode=mode)
    if mode != "reduce-overhead":
        return compiled

    def forward_cloned(*args):
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(*args)
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()

    return forward_cloned


def _loader(autocast: torch.dtype | None = None, attention: str = "torch", compile_mode: str | bool = False):
    def load(req: LoadRequest) -> Episode:
        weights = req.weights or make_weights(req.cfg, req.checkpoint, req.sam2_checkpoint, req.dino_checkpoint,
                                              req.seed)
        if req.threads:
            torch.set_num_threads(req.threads)
        stages = build_stages(weights, attention)
        modules = stages.modules()
        for mod in modules.values():
            mod.to(req.device)
            if compile_mode is not False:
                mod.forward = compiled_forward(mod.forward, compile_mode or None)
        episode = Episode(torch_runners(stages, req.cfg, autocast), req.cfg, req.device)
        episode.settings = {"autocast": str(autocast).replace("torch.", "") if autocast else None,
                            "attention": attention, "torch_compile": compile_mode is not False,
                            "compile_mode": compile_mode or None}
        return episode

    return load


for _b in (
    Backend("torch", "pytorch", "PyTorch eager fp32, the reference's way on a CPU", _loader(), demo=("cpu", "cuda")),
    Backend("torch-bf16", "pytorch", "PyTorch eager under bf16 autocast (the reference's own precision)",
            _loader(autocast=torch.bfloat16), precision="bf16", accuracy="fast", demo=("cuda",)),
    Backend("torch-fused", "pytorch", "PyTorch eager with the fused Triton calibrated attention",
            _loader(attention="op"), devices=("cuda",), requires=("triton",), demo=("cuda",)),
    Backend("torch-compile", "pytorch", "torch.compile (Inductor) of every stage, fp32",
            _loader(attention="auto", compile_mode=None), tune=("cuda",)),  # CPU: minutes to compile, ~eager speed
    Backend("torch-compile-bf16", "pytorch", "torch.compile + CUDA graphs (reduce-overhead) under bf16 autocast, "
            "fused attention", _loader(torch.bfloat16, "op", "reduce-overhead"), devices=("cuda",),
            requires=("triton",), precision="bf16", accuracy="fast", demo=("cuda",)),
):
    register(_b)
