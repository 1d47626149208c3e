"""`fssam bench`'s loop: one backend open at a time, rows in (shots, batch, backend) order."""

from __future__ import annotations

import pytest

from fssam_deploy.bench import run as bench_run


def test_one_backend_open_at_a_time(tiny_cfg, monkeypatch):
    opened, open_now, most = [], set(), [0]
    real_open = bench_run.open_backend

    def tracking_open(name, *args, **kwargs):
        ep = real_open(name, *args, **kwargs)
        real_close = ep.close
        key = (name, len(opened))
        opened.append(name)
        open_now.add(key)
        most[0] = max(most[0], len(open_now))

        def close():
            open_now.discard(key)
            real_close()

        ep.close = close
        return ep

    monkeypatch.setattr(bench_run, "open_backend", tracking_open)
    st = bench_run.BenchSettings(backends=["torch", "torch-bf16", "torch"], batches=[1, 2], shots=[1], cfg=tiny_cfg,
                                 warmup=1, iters=1, gemm_floor=False)
    rows = bench_run.run_bench(st, progress=False)["rows"]
    assert most[0] == 1 and not open_now  # the reference, then each backend, each closed before the next
    assert opened == ["torch", "torch", "torch-bf16", "torch"]
    # per (shots, batch), the backends in the order the flag lists them, a repeated name included
    assert [(r["batch"], r["backend"]) for r in rows] == [(1, "torch"), (1, "torch-bf16"), (1, "torch"),
                                                          (2, "torch"), (2, "torch-bf16"), (2, "torch")]
    assert all("mask_iou" in r for r in rows)
    assert all(r["first_episode_ms"] >= 0.05 * r["episode"]["min_ms"] for r in rows), rows  # ms, not seconds
    assert all(r["mask_iou"] >= 0.999 for r in rows if r["backend"] == "torch")  # against its own reference


def test_stage_breakdown_is_the_median():
    """Two timed episodes: the breakdown is their mean, not the slower one; odd counts: the middle one."""
    runs = [{"a": 0.010, "b": 0.002}, {"a": 0.030, "b": 0.004}]
    assert bench_run.stage_medians_ms(runs) == pytest.approx({"a": 20.0, "b": 3.0})
    assert bench_run.stage_medians_ms([*runs, {"a": 0.011, "b": 0.001}]) == pytest.approx({"a": 11.0, "b": 2.0})
