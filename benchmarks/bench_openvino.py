"""OpenVINO against ONNX Runtime on this CPU: the two big graphs, then whole episodes; one process, side by side.

    python benchmarks/bench_openvino.py --preset tiny|paper [--iters 5] [--threads 2] [--onnx-dir GRAPHS]
        [--no-episode] [--ep-python /tmp/venv-ovep/bin/python]

Per graph (DINOv2, SAM 2 image encoder; batch 1, a synthetic query image): ONNX Runtime CPU fp32, OpenVINO fp32
(INFERENCE_PRECISION_HINT f32), OpenVINO bf16 hint, OpenVINO int8 (NNCF IR of `fssam build --precision int8`)
with the f32 and with the bf16 hint, iterations interleaved round-robin so that a busy machine slows every
runner alike; median ms and the max error relative to ONNX Runtime's output scale. Episodes (1-shot, batch 1,
one warm-up each): torch, torch-bf16, onnxruntime, openvino, openvino-bf16, openvino-int8 and
openvino-int8-bf16 through `backends.open_backend`, mask IoU against torch. `--ep-python`: a Python whose
environment has `onnxruntime-openvino` (it replaces `onnxruntime`, so it lives in its own venv) times ONNX
Runtime's OpenVINO execution provider on the DINOv2 graph against that environment's CPU provider. The fp32 and
bf16 matmul rates of this CPU (`bench.flops.floor_environment`: the fastest of torch and OpenVINO, and each) are
measured in the same run, for the GEMM floor.
Prints a table and writes `benchmarks/results/bench_openvino_<preset>_<cpu>.json` with the CPU named and the
load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from fssam_deploy.backends.onnxruntime.runner import OnnxRuntimeRunner
from fssam_deploy.backends.openvino.build import build_openvino
from fssam_deploy.backends.openvino.runner import OpenVinoRunner, compile_config
from fssam_deploy.backends.registry import open_backend
from fssam_deploy.bench.flops import floor_environment
from fssam_deploy.bench.report import write_cpu_result
from fssam_deploy.hostinfo import cpu_info, host_summary, openvino_capabilities
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.onnx.export import export_onnx, read_manifest
from fssam_deploy.parity import parity
from fssam_deploy.stages import STAGE_SPECS
from fssam_deploy.synthetic import episode_tensors

GRAPHS = ("dino_features", "image_encoder")
EP_SCRIPT = r"""
import json, statistics, sys, time, numpy as np, onnxruntime as ort
path, threads, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x = {"images": (np.random.default_rng(0).random((1, 3, int(sys.argv[4]), int(sys.argv[4]))) * 255).astype(np.float32)}
out = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
for name, prov in (("ep_openvino", [("OpenVINOExecutionProvider", {"device_type": "CPU", "num_of_threads": threads,
                   "precision": "FP32"})]), ("ep_cpu", ["CPUExecutionProvider"])):
    so = ort.SessionOptions(); so.intra_op_num_threads = threads
    t0 = time.perf_counter(); s = ort.InferenceSession(path, so, providers=prov); load = time.perf_counter() - t0
    s.run(None, x)
    ts = []
    for _ in range(iters):
        t = time.perf_counter(); s.run(None, x); ts.append((time.perf_counter() - t) * 1e3)
    out[name] = {"median_ms": statistics.median(ts), "load_s": load, "providers": s.get_providers()}
print(json.dumps(out))
"""


def graph_runners(onnx_dir: Path, ov: dict[str, Path], stage: str, cfg: FSSAMConfig, threads: int) -> dict:
    spec = STAGE_SPECS[stage]
    shape_fn = lambda b: {t.name: t.concrete(cfg, b, cfg.shots) for t in spec.outputs}  # noqa: E731
    return {"onnxruntime": OnnxRuntimeRunner(onnx_dir / f"{stage}.onnx", spec, shape_fn, "cpu", threads),
            "openvino": OpenVinoRunner(ov["fp32"] / f"{stage}.xml", spec, cfg, compile_config("f32", threads)),
            "openvino-bf16 (hint)": OpenVinoRunner(ov["fp32"] / f"{stage}.xml", spec, cfg,
                                                   compile_config("bf16", threads)),
            "openvino-int8": OpenVinoRunner(ov["int8"] / f"{stage}.xml", spec, cfg, compile_config("f32", threads)),
            "openvino-int8 + bf16 hint": OpenVinoRunner(ov["int8"] / f"{stage}.xml", spec, cfg,
                                                        compile_config("bf16", threads))}


def time_graphs(onnx_dir, ov, cfg, threads, iters) -> list[dict]:
    image = episode_tensors(cfg, 1, 1, 0)[0]  # (1, 3, S, S)
    rows = []
    for stage in GRAPHS:
        runners = graph_runners(onnx_dir, ov, stage, cfg, threads)
        for r in runners.values():
            r.activate()
        ref = runners["onnxruntime"].infer({"images": image})
        for r in runners.values():  # warm-up
            r.infer({"images": image})
        times = {n: [] for n in runners}
        for _ in range(iters):
            for n, r in runners.items():
                t0 = time.perf_counter()
                r.infer({"images": image})
                times[n].append((time.perf_counter() - t0) * 1e3)
        base = statistics.median(times["onnxruntime"])
        for n, r in runners.items():
            out = r.infer({"images": image})
            err = max(((out[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref)
            rows.append({"graph": stage, "runner": n, "median_ms": statistics.median(times[n]),
                         "vs_onnxruntime": base / statistics.median(times[n]), "rel_err_vs_onnxruntime": err,
                         "compiled_precision": getattr(r, "compiled_precision", None)})
            r.deactivate()
    return rows


def time_episodes(cfg, onnx_dir, ov, threads, iters) -> list[dict]:
    q, sx, sy = episode_tensors(cfg, 1, 1, 0)
    dirs = {"torch": None, "torch-bf16": None, "onnxruntime": onnx_dir, "openvino": ov["fp32"],
            "openvino-bf16": ov["fp32"], "openvino-int8": ov["int8"], "openvino-int8-bf16": ov["int8"]}
    eps = {n: open_backend(n, cfg, engine_dir=d, seed=0, threads=threads) for n, d in dirs.items()}
    try:
        ref = eps["torch"].segment(q, sx, sy)
        for ep in eps.values():  # warm-up
            ep.segment(q, sx, sy)
        times = {n: [] for n in eps}
        for _ in range(iters):
            for n, ep in eps.items():
                t0 = time.perf_counter()
                ep.segment(q, sx, sy)
                times[n].append((time.perf_counter() - t0) * 1e3)
        base = statistics.median(times["torch"])
        return [{"backend": n, "median_ms": statistics.median(t), "vs_torch": base / statistics.median(t),
                 **parity(eps[n].segment(q, sx, sy), ref)} for n, t in times.items()]
    finally:
        for ep in eps.values():
            ep.close()


def time_ep(python: str, onnx_dir: Path, cfg, threads: int, iters: int) -> dict:
    proc = subprocess.run([python, "-c", EP_SCRIPT, str(onnx_dir / "dino_features.onnx"), str(threads), str(iters),
                           str(cfg.image_size)], capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--onnx-dir", help="fp32 dynamic-batch graphs of --preset (default: exported here, seed 0)")
    ap.add_argument("--no-episode", action="store_true")
    ap.add_argument("--ep-python", help="python of a venv with onnxruntime-openvino")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    cfg = FSSAMConfig.from_name(args.preset)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-openvino-") as tmp:
        onnx_dir = Path(args.onnx_dir) if args.onnx_dir else export_onnx(cfg, Path(tmp) / "onnx", seed=0,
                                                                           batch="dynamic", progress=False)
        cfg = read_manifest(onnx_dir).config
        ov = {p: build_openvino(onnx_dir, Path(tmp) / p, precision=p, threads=args.threads) for p in ("fp32", "int8")}
        result = {"host": host_summary(args.threads), "cpu": cpu_info(), "openvino_capabilities":
                  list(openvino_capabilities() or ()), "config": cfg.to_dict(), "threads": args.threads,
                  "iters": args.iters, "graphs": time_graphs(onnx_dir, ov, cfg, args.threads, args.iters),
                  **floor_environment(threads=args.threads)}
        if not args.no_episode:
            result["episodes"] = time_episodes(cfg, onnx_dir, ov, args.threads, args.iters)
        if args.ep_python:
            result["onnxruntime_openvino_ep"] = time_ep(args.ep_python, onnx_dir, cfg, args.threads, args.iters)
    result["load_average"] = {"before": load_before, "after": os.getloadavg()}
    print(f"{cfg.sam2_config} + {cfg.dino}, {cfg.image_size} px on {result['host']}; load average "
          f"{load_before[0]:.1f} -> {result['load_average']['after'][0]:.1f}")
    print("| graph | runner | median ms | vs ONNX Runtime | rel err vs ORT | compiled precision |")
    print("|---|---|---|---|---|---|")
    for r in result["graphs"]:
        print(f"| {r['graph']} | {r['runner']} | {r['median_ms']:.1f} | {r['vs_onnxruntime']:.2f}x | "
              f"{r['rel_err_vs_onnxruntime']:.1e} | {r['compiled_precision'] or '-'} |")
    for r in result.get("episodes", []):
        print(f"| episode 1-shot | {r['backend']} | {r['median_ms']:.1f} | {r['vs_torch']:.2f}x vs torch | "
              f"IoU {r['mask_iou']:.4f} | max logit err {r['max_abs_logit_err']:.1e} |")
    print("matmul 2048^3 GFLOP/s:", {lib: {k: round(v, 1) for k, v in r.items()}
                                     for lib, r in result["matmul_gflops_by_library"].items()})
    if "onnxruntime_openvino_ep" in result:
        print("ONNX Runtime OpenVINO EP (DINOv2):", json.dumps(result["onnxruntime_openvino_ep"]))
    write_cpu_result(result, args.out, f"bench_openvino_{args.preset}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
