"""Benchmark results as JSON, a Markdown table and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path


def _device(env: dict) -> str:
    """The GPU, or the CPU model with its ISA features and threads (`hostinfo.host_summary`)."""
    if env.get("gpu"):
        return f"{env['gpu']} ({env['device']})"
    if env.get("host"):
        return f"{env['host']} ({env['device']})"
    return f"{env['processor']} ({env['device']}, {env['threads']} threads)"


def markdown_table(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    lines = [f"Config: {cfg['sam2_config']} + {cfg['dino']}, {cfg['image_size']} px, {cfg['num_refine']} x "
             f"{cfg['refine']}. Device: {_device(env)}, torch {env['torch']}"
             + (f", onnxruntime {env['onnxruntime']}" if "onnxruntime" in env else "") + ".", "",
             "| backend | K | B | episode median ms | p90 ms | episodes/s | cached query ms | queries/s (cached) "
             "| cached speed-up | overhead % | mask IoU | max logit err | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['backend']} | {r['shots']} | {r['batch']} | {r['episode']['median_ms']:.1f} | "
            f"{r['episode']['p90_ms']:.1f} | {r['episodes_per_s']:.2f} | {r['cached_query']['median_ms']:.1f} | "
            f"{r['cached_queries_per_s']:.2f} | {r['cached_speedup']:.2f}x | {r['runtime_overhead_pct']:.1f} | "
            f"{r.get('mask_iou', float('nan')):.4f} | {r.get('max_abs_logit_err', float('nan')):.2e} | "
            f"{r['rss_peak_mb']:.0f} |")
    lines += ["", "Stage medians (ms):", ""]
    names = sorted({k for r in result["rows"] for k in r["stages_ms"]})
    lines.append("| backend | K | B | " + " | ".join(names) + " |")
    lines.append("|---|---|---|" + "---|" * len(names))
    for r in result["rows"]:
        vals = " | ".join(f"{r['stages_ms'].get(n, float('nan')):.1f}" for n in names)
        lines.append(f"| {r['backend']} | {r['shots']} | {r['batch']} | {vals} |")
    return "\n".join(lines + floor_table(result)) + "\n"


FLOOR_DTYPES = ("fp32", "bf16")


def _ms(v) -> str:
    return "" if v is None else f"{v:.1f}"


def _x(v) -> str:
    return "" if v is None else f"{v:.2f}x" if v >= 0.1 else f"{v:.2g}x"


def _libraries(by_library: dict, dtype: str, best: float) -> str:
    """" (openvino; torch 183)": which library gave the floor's rate and what the others reached, where more than
    one was measured."""
    rates = {lib: r[dtype] for lib, r in by_library.items() if r.get(dtype)}
    if len(rates) < 2:
        return ""
    top = max(rates, key=rates.get)
    return f" ({top}; " + ", ".join(f"{lib} {_rate(v)}" for lib, v in rates.items() if lib != top) + ")"


def _rate(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.2g}"  # AVX2's emulated bf16: 0.29 GFLOP/s


def floor_table(result: dict) -> list[str]:
    """The GEMM floor section: the episode's FLOPs per stage, and each backend's episode time over the fp32 and
    the bf16 floor (FLOPs / that matmul rate, the fastest library's, measured in the same run). The lower floor
    is the machine's: bf16 on a CPU with AMX or AVX512-BF16, fp32 where bf16 is emulated (AVX2). Empty when the
    bench counted no FLOPs."""
    rows = [r for r in result["rows"] if "gflop" in r]
    rates = result["environment"].get("matmul_gflops")
    if not rows or not rates:
        return []
    dtypes = [d for d in FLOOR_DTYPES if rates.get(d)]
    fastest = max(dtypes, key=lambda d: rates[d])
    names = sorted({k for r in rows for k in r["stage_gflop"]})
    by_library = result["environment"].get("matmul_gflops_by_library") or {}
    lines = ["", "GEMM floor: matmul 2048^3 on this device"
             + (f", the fastest of {' and '.join(by_library)}" if len(by_library) > 1 else "") + ", "
             + ", ".join(f"{d} {_rate(rates[d])} GFLOP/s{_libraries(by_library, d, rates[d])}" for d in dtypes)
             + f"; an episode's FLOPs (matmul, convolution, attention) over a rate is its floor at that precision. "
             f"{fastest} is the faster here, so the {fastest} floor is this machine's.", "",
             "| K | B | " + " | ".join(f"{n} GFLOP" for n in names) + " | episode GFLOP | "
             + " | ".join(f"{d} floor ms" for d in dtypes) + " |",
             "|---|---|" + "---|" * (len(names) + 1 + len(dtypes))]
    for k, b in sorted({(r["shots"], r["batch"]) for r in rows}):
        r = next(r for r in rows if (r["shots"], r["batch"]) == (k, b))
        vals = " | ".join(f"{r['stage_gflop'].get(n, 0.0):.1f}" for n in names)
        floors = " | ".join(_ms(r.get(f"{d}_floor_ms")) for d in dtypes)
        lines.append(f"| {k} | {b} | {vals} | {r['gflop']:.1f} | {floors} |")
    lines += ["", "| backend | K | B | episode median ms | " + " | ".join(f"episode / {d} floor" for d in dtypes)
              + " |", "|---|---|---|---|" + "---|" * len(dtypes)]
    for r in rows:
        over = " | ".join(_x(r.get(f"vs_{d}_floor")) for d in dtypes)
        lines.append(f"| {r['backend']} | {r['shots']} | {r['batch']} | {r['episode']['median_ms']:.1f} | {over} |")
    return lines


BASELINE = "torch"  # PyTorch eager fp32: every speed-up is over it
BF16_BASELINE = "torch-bf16"  # bf16 autocast, the reference's own reduced precision


def speedups(rows: list[dict]) -> dict[tuple, dict]:
    """{(backend, shots, batch): {"vs_torch", "vs_torch_bf16"}}: episode median speed-up over the baseline rows
    of the same (shots, batch) (None where that baseline was not run)."""
    base = {(r["backend"], r["shots"], r["batch"]): r["episode"]["median_ms"] for r in rows}
    out = {}
    for r in rows:
        k, b, ms = r["shots"], r["batch"], r["episode"]["median_ms"]
        fp32, bf16 = base.get((BASELINE, k, b)), base.get((BF16_BASELINE, k, b))
        out[(r["backend"], k, b)] = {"vs_torch": fp32 / ms if fp32 else None,
                                     "vs_torch_bf16": bf16 / ms if bf16 else None}
    return out


def _bar_label(row: dict, up: dict) -> str:
    """What is written on a bar: the speed-up, the mask IoU against torch fp32, the speed-up over bf16."""
    lines = [f"{up['vs_torch']:.2f}x" if up["vs_torch"] is not None else f"{row['episode']['median_ms']:.0f} ms"]
    if row.get("mask_iou") is not None:
        lines.append(f"IoU {row['mask_iou']:.3f}")
    if up["vs_torch_bf16"] is not None and row["backend"] != BF16_BASELINE:
        lines.append(f"{up['vs_torch_bf16']:.2f}x bf16")
    return "\n".join(lines)


def _plot_speedups(ax, rows: list[dict], backends: list[str], colors: dict) -> None:
    """Grouped bars, one group per (shots, batch): each backend's episode speed-up over torch fp32."""
    ups = speedups(rows)
    groups = sorted({(r["shots"], r["batch"]) for r in rows})
    have_base = all((BASELINE, k, b) in ups for k, b in groups)
    width = 0.8 / len(backends)
    top = 0.0
    for gi, (k, b) in enumerate(groups):
        for bi, name in enumerate(backends):
            row = next((r for r in rows if (r["backend"], r["shots"], r["batch"]) == (name, k, b)), None)
            if row is None:
                continue
            up = ups[(name, k, b)]
            height = up["vs_torch"] if have_base else row["episode"]["median_ms"]
            x = gi - 0.4 + width * (bi + 0.5)
            ax.bar(x, height, width * 0.92, color=colors[name], label=name if gi == 0 else None)
            ax.text(x, height, _bar_label(row, up), ha="center", va="bottom", fontsize=7, linespacing=1.1)
            top = max(top, height)
    ax.set_xticks(range(len(groups)), [f"K={k} shot{'s' if k > 1 else ''}, B={b}" for k, b in groups])
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_ylim(0, top * 1.3 or 1)
    if have_base:
        ax.axhline(1.0, color="0.3", lw=0.8, ls="--")
        ax.set_ylabel("episode speed-up over torch fp32 (x)")
        bf16 = any(r["backend"] == BF16_BASELINE for r in rows)
        ax.set_title("Episode speed-up over PyTorch fp32 eager\n(on each bar: speed-up, mask IoU vs torch fp32"
                     + (", speed-up over torch-bf16)" if bf16 else ")"), fontsize=10)
    else:
        ax.set_ylabel("episode median (ms)")
        ax.set_title("Episode latency (no torch fp32 row to compute speed-ups over)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False, title="backend",
              title_fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _plot_stages(ax, rows: list[dict], colors: list) -> None:
    """Horizontal stacked bars: each row's median stage times (ms), the total at the end."""
    from fssam_deploy.stages import STAGE_SPECS

    names = [n for n in STAGE_SPECS if any(n in r["stages_ms"] for r in rows)]
    names += sorted({n for r in rows for n in r["stages_ms"]} - set(names))
    order = sorted(rows, key=lambda r: (r["shots"], r["batch"]))
    labels = [f"{r['backend']}  K={r['shots']} B={r['batch']}" for r in order]
    left = [0.0] * len(order)
    for i, n in enumerate(names):
        vals = [r["stages_ms"].get(n, 0.0) for r in order]
        ax.barh(range(len(order)), vals, left=left, color=colors[i % len(colors)], label=n, height=0.7)
        left = [a + v for a, v in zip(left, vals)]
    for y, total in enumerate(left):
        ax.text(total, y, f" {total:.0f} ms", va="center", fontsize=7)
    for y in range(1, len(order)):  # a rule between (shots, batch) groups
        if (order[y]["shots"], order[y]["batch"]) != (order[y - 1]["shots"], order[y - 1]["batch"]):
            ax.axhline(y - 0.5, color="0.5", lw=0.8)
    ax.set_yticks(range(len(order)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(left or [1]) * 1.15)
    ax.set_xlabel("ms per episode (sum of stage medians)")
    ax.set_title("Per-stage breakdown", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False, title="stage",
              title_fontsize=8)
    ax.grid(axis="x", alpha=0.3)


def plot(result: dict, path: Path) -> None:
    """Top: each backend's episode speed-up over torch fp32 (bars grouped per (shots, batch), mask IoU and the
    speed-up over torch-bf16 written on each). Bottom: the per-stage breakdown (ms) of every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    cmap = plt.get_cmap("tab10")
    colors = {name: cmap(i % 10) for i, name in enumerate(backends)}
    groups = len({(r["shots"], r["batch"]) for r in rows})
    width = max(8.0, 2.8 + groups * (0.75 * len(backends) + 0.6))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(width, 5.0 + 0.28 * len(rows)),
                                   gridspec_kw={"height_ratios": [1.25, 0.35 + 0.06 * len(rows)]})
    _plot_speedups(ax1, rows, backends, colors)
    _plot_stages(ax2, rows, [plt.get_cmap("Set2")(i) for i in range(8)])
    env = result.get("environment", {})
    host = env.get("host") or env.get("cpu") or env.get("gpu") or env.get("processor", "")
    cfg = result.get("config", {})
    fig.suptitle(f"{cfg.get('sam2_config', '')} + {cfg.get('dino', '')}, {cfg.get('image_size', '')} px on {host}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_report(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / "bench.md").write_text(markdown_table(result))
    plot(result, out_dir / "bench.png")


def write_cpu_result(result: dict, out_dir: str | Path, stem: str) -> Path:
    """A benchmark script's JSON as `<out_dir>/<stem>_<cpu model>.json` (the CPU decides, so it names the file);
    prints and returns the path."""
    import re

    from fssam_deploy.hostinfo import cpu_info

    cpu = re.sub(r"[^a-z0-9]+", "_", cpu_info()["model"].lower()).strip("_")
    path = Path(out_dir) / f"{stem}_{cpu}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return path
