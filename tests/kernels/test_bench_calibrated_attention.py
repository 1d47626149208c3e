"""The benchmark script runs end to end at a tiny shape and writes what it promises."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_calibrated_attention")


def test_bench_writes_json_and_markdown(bench, kernel_device, tmp_path):
    dtype = "fp32" if kernel_device == "cpu" else "fp16"
    argv = ["--device", kernel_device, "--nq", "16", "--head-dim", "32", "--dtype", dtype, "--batch", "1,2",
            "--shots", "1,5", "--warmup", "1", "--iters", "2", "--out", str(tmp_path)]
    result = bench.main(argv)
    saved = json.loads((tmp_path / "bench_calibrated_attention.json").read_text())
    assert saved == json.loads(json.dumps(result))
    env = saved["environment"]
    assert env["settings"]["batch"] == [1, 2] and env["settings"]["nq"] == 16 and env["settings"]["iters"] == 2
    assert env["torch"] and env["triton"] and env["device_name"]
    rows = saved["rows"]
    assert len(rows) == 2 * 2 * 3  # shots x batch x implementations
    assert {r["n_k"] for r in rows} == {2 * 16 + 8, 6 * 16 + 24}
    for row in rows:
        assert row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"] and row["tflops"] > 0
        if row["impl"] == "fused_triton":
            assert row["max_abs_vs_fp32_ref"] < (1e-5 if dtype == "fp32" else 2e-3)
    markdown = (tmp_path / "bench_calibrated_attention.md").read_text()
    assert "| shots | dtype | B | Nk | impl |" in markdown and markdown.count("fused_triton") == 4


def test_bench_rejects_unknown_dtype(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--dtype", "fp8"])
