"""onnxslim against onnx-simplifier (onnxsim) on every stage's graph: node count, simplify time, ONNX Runtime latency.

Each stage is exported once with the dynamo exporter (`onnx.export.export_raw`, the graph `fssam export`
then simplifies), then simplified by each tool. Every variant runs on ONNX Runtime's CPU provider with the
runner's session options (ORT_ENABLE_ALL, no spinning threads) on the stage's dummy inputs, the variants taking
turns run by run (so a shared machine's load falls on all alike). Per variant: node count, simplify time, median
and p90 latency, the max abs difference of its outputs to the unsimplified graph's, and whether it passes
`check_graph` (checker, full shape inference, standard ops only). Writes JSON and Markdown.

    python benchmarks/compare_simplifiers.py --config tiny --out out/simplifiers --warmup 2 --iters 15

onnxsim is optional (`pip install onnxsim`): without it the script measures the others and says so.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

TOOLS = ("none", "onnxslim", "onnxsim")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="FSSAMConfig preset name")
    p.add_argument("--shots", type=int, default=None, help="override the preset's shots")
    p.add_argument("--stages", default=None, help="comma-separated stages (default: every stage of STAGE_SPECS)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--seed", type=int, default=0, help="random weights' seed")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per graph")
    p.add_argument("--iters", type=int, default=5, help="timed runs per graph")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--onnxsim-skip", default="fuse_attention",
                   help="comma-separated onnxsim optimizer passes to skip (fuse_attention emits com.microsoft::"
                        "Attention, which `fssam export` does not allow); '' runs them all")
    p.add_argument("--out", type=Path, default=Path("out/compare_simplifiers"), help="output folder")
    return p.parse_args(argv)


def simplifiers(onnxsim_skip: list[str]) -> dict:
    """{tool: simplify(model) -> model} for the tools installed; a missing one is reported, not fatal."""
    import onnxslim

    tools = {"none": lambda m: m, "onnxslim": onnxslim.slim}
    try:
        import onnxsim
    except ImportError:
        print("onnxsim (onnx-simplifier) is not installed: measuring without it (pip install onnxsim)")
    else:
        def run_onnxsim(model):
            # no self-check (check_n=0): time the simplification only; accuracy is measured below
            simplified, ok = onnxsim.simplify(model, check_n=0, skipped_optimizers=onnxsim_skip or None)
            if not ok:
                raise RuntimeError("onnxsim reported a failed simplification")
            return simplified

        tools["onnxsim"] = run_onnxsim
    return tools


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def interleaved_latency(sessions: dict, feeds: dict[str, np.ndarray], warmup: int, iters: int) -> tuple[dict, dict]:
    """{tool: outputs}, {tool: [ms]}: the graphs take turns, one run each per round (the starting tool rotates),
    so that load from other processes on a shared machine falls on every variant alike."""
    feeds = {t: {i.name: feeds[i.name] for i in s.get_inputs()} for t, s in sessions.items()}  # dropped inputs
    tools, outs, times = list(sessions), {}, {t: [] for t in sessions}
    for r in range(warmup + iters):
        for tool in tools[r % len(tools):] + tools[: r % len(tools)]:
            t0 = time.perf_counter()
            outs[tool] = sessions[tool].run(None, feeds[tool])
            if r >= warmup:
                times[tool].append((time.perf_counter() - t0) * 1e3)
    return outs, times


def simplify_all(name: str, raw: Path, tools: dict, tmp: Path) -> list[dict]:
    """One row per tool: the simplified graph's path, node count, time, and check_graph's verdict (or the error)."""
    import onnx

    from fssam_deploy.onnx.export import check_graph

    rows = []
    for tool, simplify in tools.items():
        model = onnx.load(str(raw))
        t0 = time.perf_counter()
        try:
            model = simplify(model)
        except Exception as exc:  # a tool that fails on a graph is a result, not a crash
            rows.append({"stage": name, "tool": tool, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        simplify_s = time.perf_counter() - t0
        path = tmp / f"{name}.{tool}.onnx"
        onnx.save(model, str(path))
        try:
            check_graph(path)  # what `fssam export` requires: checker, full shape inference, standard ops only
            check = "ok"
        except Exception as exc:
            check = f"{type(exc).__name__}: {str(exc).replace(str(path) + ': ', '')}"[:200]
        rows.append({"stage": name, "tool": tool, "path": path, "nodes": len(model.graph.node),
                     "simplify_s": simplify_s, "file_mb": path.stat().st_size / 2**20, "check": check})
    return rows


def measure_stage(name: str, module, cfg, args, tools: dict, tmp: Path) -> list[dict]:
    from fssam_deploy.onnx.export import export_raw
    from fssam_deploy.stages import STAGE_SPECS

    raw = tmp / f"{name}.raw.onnx"
    t0 = time.perf_counter()
    example = export_raw(module, STAGE_SPECS[name], cfg, raw, args.opset, False, cfg.shots)
    export_s = time.perf_counter() - t0
    rows = simplify_all(name, raw, tools, tmp)
    ok = [r for r in rows if "error" not in r]
    sessions = {r["tool"]: session(r.pop("path"), args.threads) for r in ok}
    outs, times = interleaved_latency(sessions, {k: v.numpy() for k, v in example.items()}, args.warmup, args.iters)
    reference = outs[next(iter(outs))]  # "none", the exporter's own graph
    for r in ok:
        t = sorted(times[r["tool"]])
        diff = max(float(np.abs(a - b).max()) for a, b in zip(outs[r["tool"]], reference))
        r.update({"export_s": export_s, "median_ms": statistics.median(t),
                  "p90_ms": t[min(len(t) - 1, int(0.9 * len(t)))], "max_abs_diff_vs_none": diff})
        print(f"{name:15s} {r['tool']:9s} nodes {r['nodes']:4d}  simplify {r['simplify_s']:6.2f} s  "
              f"ORT median {r['median_ms']:8.1f} ms  diff {diff:.1e}  check {r['check']}", flush=True)
    return rows


def environment(args) -> dict:
    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "threads": args.threads or "default",
            "versions": {p: version(p) for p in ("torch", "onnx", "onnxruntime", "onnxslim", "onnxsim")}}


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"Config {result['preset']}, ONNX Runtime CPU ({env['cpus']} cores, {env['processor']}), "
             f"warmup {result['warmup']}, iters {result['iters']}, onnxsim skipping "
             f"[{result['onnxsim_skipped_optimizers']}]; versions {env['versions']}", "",
             "| stage | tool | nodes | export s (dynamo) | simplify s | ORT median ms | ORT p90 ms "
             "| max abs diff vs none | check_graph |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['stage']} | {r['tool']} | failed: {r['error']} | | | | | | |")
        else:
            lines.append(f"| {r['stage']} | {r['tool']} | {r['nodes']} | {r['export_s']:.1f} | {r['simplify_s']:.2f} | "
                         f"{r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['max_abs_diff_vs_none']:.1e} | {r['check']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from fssam_deploy.model import FSSAMConfig, build_stages, random_weights
    from fssam_deploy.stages import STAGE_SPECS, stage_module

    args = parse_args(argv)
    cfg = FSSAMConfig.from_name(args.config, **({"shots": args.shots} if args.shots else {}))
    names = args.stages.split(",") if args.stages else list(STAGE_SPECS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stages = build_stages(random_weights(cfg, args.seed), attention_backend="torch")
    tools = simplifiers([p for p in args.onnxsim_skip.split(",") if p])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows += measure_stage(name, stage_module(stages, name), cfg, args, tools, Path(tmp))
    result = {"preset": args.config, "config": cfg.to_dict(), "warmup": args.warmup, "iters": args.iters,
              "onnxsim_skipped_optimizers": args.onnxsim_skip,
              "environment": environment(args), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "simplifiers.json").write_text(json.dumps(result, indent=2))
    (args.out / "simplifiers.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {args.out}/simplifiers.json, simplifiers.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
