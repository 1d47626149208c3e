"""Inductor on this CPU under bf16 autocast, per stage: which compile settings are worth offering.

    python benchmarks/bench_inductor_cpu.py --preset tiny|paper [--iters 3] [--threads 2] [--stages a,b]

Per stage (batch 1, the spec's dummy inputs, one process, one variant after another, `torch._dynamo.reset()`
between them): eager fp32; eager bf16 autocast (`torch-bf16`); torch.compile under autocast with default
settings; with frozen weights (`freezing`: the bf16 casts folded into constants and the weights prepacked for
oneDNN; what `torch-compile-bf16` runs on the CPU); frozen + max-autotune with Inductor's C++ GEMM templates
(AMX micro-kernels); AOTInductor under autocast (as `aoti-bf16` packages a stage, with the torch attention
like the other variants); and compiled fp32 with frozen weights.
For each: the first call's seconds (compilation, with whatever Inductor cache this machine has), the median ms
over `--iters` and the max error relative to the eager fp32 output's scale. The CPU is named and the fp32 / bf16
matmul rates are measured in the same run. Prints a table and writes
`benchmarks/results/bench_inductor_<preset>_<cpu>.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from fssam_deploy.backends.aoti.build import compile_stage
from fssam_deploy.backends.pytorch import CPU_FROZEN, compiled_forward, prime
from fssam_deploy.bench.flops import floor_environment
from fssam_deploy.bench.report import write_cpu_result
from fssam_deploy.hostinfo import cpu_info, host_summary
from fssam_deploy.model.checkpoint import make_weights
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.model.fssam import build_stages
from fssam_deploy.stages import STAGE_SPECS, stage_module

STAGES = ("dino_features", "image_encoder", "memory_encoder", "decoder")
AUTOTUNE = {**CPU_FROZEN, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
# variant -> (autocast bf16?, how it is built: "eager", Inductor options, or "aoti")
VARIANTS = {"eager fp32": (False, "eager"), "eager bf16": (True, "eager"), "compile bf16": (True, {}),
            "compile bf16 frozen": (True, CPU_FROZEN), "compile bf16 frozen + autotune (C++ GEMM)": (True, AUTOTUNE),
            "aoti bf16": (True, "aoti"), "compile fp32 frozen": (False, CPU_FROZEN)}


def variant_fn(module, spec, cfg, how, bf16: bool, tmp: Path):
    if how == "eager":
        return module
    if how == "aoti":
        path = tmp / f"{spec.name}.pt2"
        compile_stage(module, spec, cfg, path, torch.device("cpu"), 1, "bf16" if bf16 else "fp32")
        return torch._inductor.aoti_load_package(str(path))
    prime(module, spec, cfg, torch.device("cpu"))
    return compiled_forward(module.forward, None, how)


def time_variant(fn, args, bf16: bool, iters: int) -> tuple[float, list[float], tuple]:
    def call():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            out = fn(*args)
        return out if isinstance(out, (tuple, list)) else (out,)

    t0 = time.perf_counter()
    out = call()
    first = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1e3)
    return first, times, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    cfg = FSSAMConfig.from_name(args.preset)
    load_before = os.getloadavg()
    weights = make_weights(cfg, None, seed=0, warn=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-inductor-") as tmp:
        for name in args.stages.split(","):
            spec = STAGE_SPECS[name]
            feed = spec.dummy_inputs(cfg, 1, cfg.shots, 0)
            args_ = [feed[n] for n in spec.input_names]
            ref = None
            for variant, (bf16, how) in VARIANTS.items():
                torch._dynamo.reset()
                module = stage_module(build_stages(weights, "torch"), name)
                t0 = time.perf_counter()
                fn = variant_fn(module, spec, cfg, how, bf16, Path(tmp))
                build_s = time.perf_counter() - t0
                first, times, out = time_variant(fn, args_, bf16, args.iters)
                if ref is None:
                    ref = out  # eager fp32 comes first
                err = max(((o.float() - r).abs().max() / r.abs().max()).item() for o, r in zip(out, ref))
                rows.append({"stage": name, "variant": variant, "first_call_s": build_s + first,
                             "median_ms": statistics.median(times), "rel_err_vs_fp32": err})
                print(f"| {name} | {variant} | {build_s + first:.1f} | {rows[-1]['median_ms']:.1f} | {err:.1e} |",
                      flush=True)
    base = {r["stage"]: r["median_ms"] for r in rows if r["variant"] == "eager bf16"}
    for r in rows:
        r["vs_eager_bf16"] = base[r["stage"]] / r["median_ms"]
    result = {"host": host_summary(args.threads), "cpu": cpu_info(), "config": cfg.to_dict(), "threads": args.threads,
              "iters": args.iters, "torch": torch.__version__, "stages": rows,
              **floor_environment(threads=args.threads),
              "load_average": {"before": load_before, "after": os.getloadavg()}}
    print(f"{cfg.sam2_config} + {cfg.dino}, {cfg.image_size} px on {result['host']}; torch {torch.__version__}; "
          f"load average {load_before[0]:.1f} -> {result['load_average']['after'][0]:.1f}")
    print("| stage | variant | first call s | median ms | vs eager bf16 | rel err vs fp32 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['variant']} | {r['first_call_s']:.1f} | {r['median_ms']:.1f} | "
              f"{r['vs_eager_bf16']:.2f}x | {r['rel_err_vs_fp32']:.1e} |")
    print("matmul 2048^3 GFLOP/s:", {lib: {k: round(v, 1) for k, v in r.items()}
                                     for lib, r in result["matmul_gflops_by_library"].items()})
    write_cpu_result(result, args.out, f"bench_inductor_{args.preset}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
