"""bench.png: speed-up bars over torch fp32 with the IoU on each, and the per-stage breakdown."""

from __future__ import annotations

import pytest
from PIL import Image

from fssam_deploy.bench.report import _bar_label, markdown_table, speedups, write_report

FACTOR = {"torch": 1.0, "torch-bf16": 0.5, "onnxruntime": 0.54, "openvino": 0.45, "openvino-int8": 0.3}


def _row(backend, k, b):
    f = FACTOR[backend]
    stages = {"image_encoder": 1000 * f * k, "dino_features": 4000 * f * k, "prior": 2.0, "memory_encoder": 90 * f,
              "refinement": 1.0, "decoder": 170 * f}
    ms = sum(stages.values())
    return {"backend": backend, "shots": k, "batch": b, "episode": {"median_ms": ms, "p90_ms": ms},
            "cached_query": {"median_ms": ms / 2, "p90_ms": ms / 2}, "episodes_per_s": 1e3 / ms,
            "cached_queries_per_s": 2e3 / ms, "cached_speedup": 2.0, "runtime_overhead_pct": 0.1,
            "mask_iou": 0.9891 if "int8" in backend else 1.0, "max_abs_logit_err": 1e-3, "rss_peak_mb": 900,
            "stages_ms": stages}


def _result(backends, shots=(1, 5), batches=(1,)):
    return {"config": {"sam2_config": "sam2_hiera_t", "dino": "dinov2_vits14", "image_size": 256, "num_refine": 3,
                       "refine": "v1"},
            "environment": {"processor": "x86_64", "device": "cpu", "threads": 2, "torch": "2.14.1"},
            "rows": [_row(n, k, b) for k in shots for b in batches for n in backends]}


def test_speedups_over_both_baselines():
    ups = speedups(_result(["torch", "torch-bf16", "openvino"])["rows"])
    assert ups[("torch", 1, 1)]["vs_torch"] == pytest.approx(1.0)
    assert ups[("openvino", 5, 1)]["vs_torch"] == pytest.approx(_row("torch", 5, 1)["episode"]["median_ms"]
                                                                / _row("openvino", 5, 1)["episode"]["median_ms"])
    assert ups[("openvino", 1, 1)]["vs_torch_bf16"] == pytest.approx(_row("torch-bf16", 1, 1)["episode"]["median_ms"]
                                                                     / _row("openvino", 1, 1)["episode"]["median_ms"])
    assert speedups(_result(["openvino"])["rows"])[("openvino", 1, 1)] == {"vs_torch": None, "vs_torch_bf16": None}


def test_bar_label_has_speedup_and_iou():
    rows = _result(["torch", "torch-bf16", "openvino-int8"])["rows"]
    row = rows[2]
    label = _bar_label(row, speedups(rows)[("openvino-int8", 1, 1)])
    assert label.splitlines()[0].endswith("x") and "IoU 0.989" in label and "x bf16" in label


@pytest.mark.parametrize(("backends", "shots", "batches"), [
    (["torch", "torch-bf16", "onnxruntime", "openvino", "openvino-int8"], (1, 5), (1,)),
    (["torch"], (1,), (1,)),  # one backend, one batch: the old line plot was empty here
    (["onnxruntime", "openvino"], (1,), (1, 2)),  # no torch row: latency bars instead of speed-ups
])
def test_write_report_draws_a_png(tmp_path, backends, shots, batches):
    result = _result(backends, shots, batches)
    write_report(result, tmp_path)
    with Image.open(tmp_path / "bench.png") as im:
        assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] >= 400
    assert (tmp_path / "bench.md").read_text() == markdown_table(result)
