"""The eval report: per backend mIoU / FB-IoU / foreground IoU / per-class IoU, the difference from the
first backend, and how far their masks agree; as `report.json` and `report.md`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from fssam_deploy.eval.metrics import score
from fssam_deploy.eval.run import EvalRun, worst_episodes


def backend_rows(run: EvalRun, classes: list[int], info: dict | None = None) -> list[dict]:
    """One dict per backend: its scores (from the records, in episode order), speed and agreement."""
    rows, first = [], None
    for name in run.backends:
        recs = [r["backends"][name] for r in run.records]
        s = score(((r["class"], b["intersection"], b["union"]) for r, b in zip(run.records, recs)), classes)
        secs = np.array([b["seconds"] for b in recs]) if recs else np.zeros(1)
        agree = np.array([b["agreement"] for b in recs]) if recs else np.ones(1)
        row = {"backend": name, **(info or {}).get(name, {}), "scores": s.to_json(),
               "forward_ms_mean": float(secs.mean() * 1e3), "episodes_per_s": float(len(recs) / secs.sum())
               if secs.sum() > 0 else None}
        first = first or row
        row["delta_miou"] = s.miou - first["scores"]["miou"]
        row["delta_fb_iou"] = s.fb_iou - first["scores"]["fb_iou"]
        row["agreement"] = {"vs": first["backend"], "min": float(agree.min()), "mean": float(agree.mean()),
                            "worst": worst_episodes(run, name) if name != first["backend"] else []}
        rows.append(row)
    return rows


def build_report(run: EvalRun, meta: dict, classes: list[int], info: dict | None = None) -> dict:
    """The JSON report: `meta` (dataset, fold, shots, episodes, config, checkpoint, device, ...) + rows."""
    return {**meta, "classes": classes, "episodes": len(run.records), "resumed_from": run.resumed_from,
            "wall_s": run.seconds,
            "backends": backend_rows(run, classes, info)}


def _pct(v: float) -> str:
    return f"{v * 100:.2f}"


def markdown(report: dict) -> str:
    """The report as Markdown: settings, the cross-backend table, per-class IoU, the worst episodes."""
    rows = report["backends"]
    lines = [f"# fssam eval: {report.get('dataset')} fold {report.get('fold')}, {report.get('shots')}-shot, "
             f"{report['episodes']} episodes", ""]
    for key in ("config", "weights", "device", "cpu", "lists", "episodes_sha256"):
        if key in report:
            lines.append(f"- {key}: {report[key] if not isinstance(report[key], dict) else json.dumps(report[key])}")
    if report.get("random_weights"):
        lines.append("- **random weights**: the scores measure nothing about FSSAM; only the differences between "
                     "backends (same weights, same episodes) mean something")
    lines += ["", "| backend | precision | mIoU % | Δ mIoU | FB-IoU % | Δ FB-IoU | fg IoU % | mask IoU vs "
              f"{rows[0]['backend']} (min / mean) | episodes/s | forward ms |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, a = r["scores"], r["agreement"]
        eps = f"{r['episodes_per_s']:.3f}" if r["episodes_per_s"] else "-"
        lines.append(f"| {r['backend']} | {r.get('precision', '-')} | {_pct(s['miou'])} | {r['delta_miou'] * 100:+.2f} "
                     f"| {_pct(s['fb_iou'])} | {r['delta_fb_iou'] * 100:+.2f} | {_pct(s['fg_iou'])} | "
                     f"{a['min']:.4f} / {a['mean']:.4f} | {eps} | {r['forward_ms_mean']:.1f} |")
    lines += ["", "| class | episodes | " + " | ".join(r["backend"] for r in rows) + " |",
              "|---|---|" + "---|" * len(rows)]
    for c in report["classes"]:
        n = rows[0]["scores"]["class_episodes"][str(c)]
        lines.append(f"| {c} | {n} | " + " | ".join(_pct(r["scores"]["class_iou"][str(c)]) for r in rows) + " |")
    for r in rows[1:]:
        if r["agreement"]["worst"]:
            lines += ["", f"Episodes where {r['backend']} disagrees most with {rows[0]['backend']} (mask IoU):", ""]
            lines += [f"- episode {w['index']}: {w['query']} class {w['class']}: {w['iou']:.4f}"
                      for w in r["agreement"]["worst"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: str | os.PathLike) -> tuple[Path, Path]:
    """report.json and report.md in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "report.json", out / "report.md"
    js.write_text(json.dumps(report, indent=1))
    md.write_text(markdown(report))
    return js, md
