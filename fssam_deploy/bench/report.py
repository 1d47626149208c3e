"""Benchmark results as JSON, a Markdown table and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path


def markdown_table(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    lines = [f"Config: {cfg['sam2_config']} + {cfg['dino']}, {cfg['image_size']} px, {cfg['num_refine']} x "
             f"{cfg['refine']}. Device: {env.get('gpu', env['processor'])} ({env['device']}, "
             f"{env['threads']} threads), torch {env['torch']}"
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
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Stage latency stacked per backend (largest batch, first K), and throughput against batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    k0 = rows[0]["shots"]
    b1 = min(r["batch"] for r in rows)
    sel = [r for r in rows if r["shots"] == k0 and r["batch"] == b1]
    names = sorted({k for r in sel for k in r["stages_ms"]})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    bottom = [0.0] * len(sel)
    for n in names:
        vals = [r["stages_ms"].get(n, 0.0) for r in sel]
        ax1.bar([r["backend"] for r in sel], vals, bottom=bottom, label=n)
        bottom = [a + b for a, b in zip(bottom, vals)]
    ax1.set_ylabel("ms per episode")
    ax1.set_title(f"stage latency, K={k0}, B={b1}")
    ax1.legend(fontsize=8)
    for name in sorted({r["backend"] for r in rows}):
        for k in sorted({r["shots"] for r in rows}):
            pts = sorted((r["batch"], r["episodes_per_s"], r["cached_queries_per_s"]) for r in rows
                         if r["backend"] == name and r["shots"] == k)
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{name} K={k} episodes/s")
            ax2.plot([p[0] for p in pts], [p[2] for p in pts], "s--", label=f"{name} K={k} cached queries/s")
    ax2.set_xlabel("batch")
    ax2.set_ylabel("per second")
    ax2.set_title("throughput")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / "bench.md").write_text(markdown_table(result))
    plot(result, out_dir / "bench.png")
