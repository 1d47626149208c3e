"""PyTorch backends: the stage modules themselves under the runner contract, eager or compiled, fp32 or bf16.

`torch_runners(stages, cfg)` is what `model.Pipeline` runs; the registered backends are the same runners
with a precision (bf16 autocast, the reference's own precision), an attention kernel (the fused Triton
op) or torch.compile applied per stage.
"""

from __future__ import annotations

import contextlib

import torch

from fssam_deploy.backends.base import Runner
from fssam_deploy.backends.inductor import FAITHFUL
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


def torch_runners(stages, cfg: FSSAMConfig, autocast: torch.dtype | None = None,
                  batch: int | None = None) -> dict[str, TorchRunner]:
    """The PyTorch stage modules of `stages` (`model.build_stages`) as runners keyed by stage name.

    Batch and shots are free (None); every other axis is checked against the spec. `batch`: a static batch
    (the leading B or M axis) instead, so that `Episode` runs a larger batch in chunks of it.
    """
    free = {"B", "M", "K"}
    runners = {}
    for name, spec in STAGE_SPECS.items():
        shapes = {t.name: tuple((batch if i == 0 and batch and d in ("B", "M") else None) if d in free else n
                                for i, (d, n) in enumerate(zip(t.shape, t.concrete(cfg, 1, 1))))
                  for t in spec.inputs}
        runners[name] = TorchRunner(stage_module(stages, name), spec, shapes, autocast)
    return runners


def batch_stride(t: torch.Tensor) -> torch.Tensor:
    """`t` with the stride of a batch axis of size 1 set to what a dense tensor has there (the element count): a
    view, no copy, no element moved. Dynamo guards on every stride, also of a size-1 axis, and a stage's input came
    as a view of another stage's output in one call (DINOv2's features without the class token: 1601 x 384 on the
    batch axis) and as a chunk of a concatenation in the next (1600 x 384), which compiled it again. The other
    strides are kept: the stages' layouts (channels-last features) were measured to matter, and copying them to
    row-major tripled the compiled memory encoder (85 vs 35 ms per episode, paper config)."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != 1 or t.numel() == 0 or t.stride(0) == t.numel():
        return t
    return t.as_strided(t.shape, (t.numel(), *t.stride()[1:]), t.storage_offset())


def compiled_forward(forward, mode: str | None, inductor: dict | None = None):
    """torch.compile of a stage's forward. `inductor`: Inductor settings patched in around every call, which is
    when dynamo traces and compiles (dynamo decides on frozen parameters while tracing; torch.compile's own
    `options=` applies later, inside Inductor, and was measured no faster with `freezing` than without), on top
    of `inductor.FAITHFUL`, which every compiled stage takes.
    Under CUDA graphs ("reduce-overhead") a stage's outputs live in the graph's static buffers, overwritten by
    its next replay (the image encoder runs on the supports, then the query): they are cloned on the way out."""
    compiled = torch.compile(forward, dynamic=False, mode=mode)

    def forward_restrided(*args):
        return compiled(*(batch_stride(a) for a in args))

    def forward_cloned(*args):
        torch.compiler.cudagraph_mark_step_begin()
        out = forward_restrided(*args)
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()

    call = forward_cloned if mode == "reduce-overhead" else forward_restrided
    settings = {**FAITHFUL, **(inductor or {})}

    def forward_patched(*args):
        with torch._inductor.config.patch(**settings):
            return call(*args)

    return forward_patched


def prime(module: torch.nn.Module, spec, cfg: FSSAMConfig, device: torch.device) -> None:
    """One eager call on the spec's dummy inputs before torch.compile: sam2's position encodings fill a
    Python cache on their first call, and dynamo guards on that cache, so without this every stage that
    has one compiles again on its second call (seen: an episode of 3.9 s instead of 0.4, tiny config)."""
    with torch.inference_mode():
        module(*(t.to(device) for t in spec.dummy_inputs(cfg, 1, cfg.shots).values()))


# On the CPU, Inductor folds the weights into constants ("freezing"): under bf16 autocast they are cast
# once, not per call, and prepacked for oneDNN's GEMMs (AMX where the CPU has it). Measured on a 2-core
# AMX Xeon, paper config, per stage vs eager bf16: DINOv2 258 vs 302 ms, image encoder 88 vs 160, decoder
# 34 vs 74 (`benchmarks/bench_inductor_cpu.py`). The frozen copy is taken at the first call: weights loaded
# into the modules after that are not seen (episodes never do that; load a new backend instead).
CPU_FROZEN = {"freezing": True}
# Compiled stages are specialised to their input shapes (dynamic=False): every new batch size compiles again,
# a minute per stage at the paper config on a 2-core CPU, and dynamo's automatic dynamic shapes were measured
# slower still to compile (tiny config: 160 s for the batch-2 recompilation). On the CPU a batch buys almost
# nothing (the stages are compute-bound at batch 1), so compiled CPU stages take batch 1 and `Episode` runs a
# batch (`fssam serve`'s dynamic batching, the query side's fg + ae memory-encoder pair) in chunks of it:
# one compilation per stage and shot count, none when the batch changes.
CPU_BATCH = 1


def _loader(autocast: torch.dtype | None = None, attention: str = "torch", compile_mode: str | bool = False,
            cpu: tuple[str, dict] | None = None):
    """`compile_mode`: False (eager), or torch.compile's mode (None: the default). `cpu`: (attention, Inductor
    options) that replace `attention` and `compile_mode` when the episode runs on the CPU."""
    def load(req: LoadRequest) -> Episode:
        att, mode, options = attention, compile_mode, None
        if cpu is not None and req.device.type == "cpu":
            att, options, mode = cpu[0], cpu[1], None
        weights = req.weights or make_weights(req.cfg, req.checkpoint, req.sam2_checkpoint, req.dino_checkpoint,
                                              req.seed)
        if req.threads:
            torch.set_num_threads(req.threads)
        stages = build_stages(weights, att)
        for name, mod in stages.modules().items():
            mod.to(req.device)
            if mode is not False:
                prime(mod, STAGE_SPECS[name], req.cfg, req.device)
                mod.forward = compiled_forward(mod.forward, mode or None, options)
        # compiled on the CPU: batch 1, larger batches in chunks (see CPU_BATCH)
        batch = CPU_BATCH if mode is not False and req.device.type == "cpu" else None
        episode = Episode(torch_runners(stages, req.cfg, autocast, batch), req.cfg, req.device)
        episode.settings = {"autocast": str(autocast).replace("torch.", "") if autocast else None,
                            "attention": att, "torch_compile": mode is not False, "compile_mode": mode or None,
                            "inductor_options": {**FAITHFUL, **(options or {})} if mode is not False else None,
                            "static_batch": batch}
        return episode

    return load


for _b in (
    Backend("torch", "pytorch", "PyTorch eager fp32, the reference's way on a CPU", _loader(), demo=("cpu", "cuda")),
    Backend("torch-bf16", "pytorch", "PyTorch eager under bf16 autocast (the reference's own precision)",
            _loader(autocast=torch.bfloat16), precision="bf16", accuracy="fast", demo=("cuda",)),
    Backend("torch-fused", "pytorch", "PyTorch eager with the fused Triton calibrated attention",
            _loader(attention="op"), devices=("cuda",), requires=("triton",), demo=("cuda",)),
    Backend("torch-compile", "pytorch", "torch.compile (Inductor) of every stage, fp32",
            _loader(attention="auto", compile_mode=None), requires_on=(("cuda", ("triton",)),),
            tune=("cuda",), jit=True),  # CPU: minutes to compile, ~eager speed
    Backend("torch-compile-bf16", "pytorch", "torch.compile under bf16 autocast: on CUDA with CUDA graphs "
            "(reduce-overhead) and the fused attention; on the CPU with frozen weights (bf16 once, AMX GEMMs)",
            _loader(torch.bfloat16, "op", "reduce-overhead", cpu=("torch", CPU_FROZEN)),
            requires_on=(("cuda", ("triton",)),), precision="bf16", accuracy="fast", demo=("cuda",), jit=True),
):
    register(_b)
