"""`fssam tune` and `--backend auto` / `--precision auto`: the measurement, the cache, the pick and its reasons."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fssam_deploy import tune
from fssam_deploy.cli import main
from fssam_deploy.errors import ConfigError
from fssam_deploy.synthetic import synthetic_episode
from tests.helpers import TINY_FLAGS


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FSSAM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_tune(cfg, rows: list[dict]) -> None:
    """A cache file as `run_tune` writes it, with made-up rows (for the pick logic)."""
    mach = tune.machine("cpu", None)
    full = []
    for r in rows:
        r = {"accuracy": "exact", "precision": "fp32", "engine_format": None, "cached_query_ms": 1.0,
             "max_abs_logit_err": 0.0, "ref_abs_max": 1.0, **r}
        r["meets"] = tune.meets(r)
        full.append(r)
    path = tune.tune_path(cfg, "cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": tune.TUNE_FORMAT, "created": "2026-12-02T00:00:00+00:00",
                                "config": cfg.to_dict(), "machine": mach, "weights": "random:0",
                                "settings": {}, "rows": full}))


def test_meets():
    row = {"accuracy": "exact", "mask_iou": 0.9995, "max_abs_logit_err": 1e-4, "ref_abs_max": 0.3}
    assert tune.meets(row) == ["exact", "fast"]
    assert tune.meets({**row, "max_abs_logit_err": 1e-2}) == ["fast"]  # masks alike, logits not within 1e-3
    assert tune.meets({**row, "accuracy": "fast"}) == ["fast"]  # an int8 / bf16 backend is never "exact"
    assert tune.meets({**row, "mask_iou": 0.97}) == []
    assert tune.meets({"accuracy": "exact", "error": "boom"}) == []


def test_tune_measures_caches_and_picks(cache, tiny_cfg, capsys):
    """Real measurement (torch and torch-bf16 at the tiny config): rows, the cache file, the picks."""
    assert main(["tune", *TINY_FLAGS, "--backends", "torch,torch-bf16", "--warmup", "0", "--iters", "1",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    files = list((cache / "tune").iterdir())
    assert len(files) == 1 and files[0] == tune.tune_path(tiny_cfg, "cpu")
    data = json.loads(files[0].read_text())
    assert data["format"] == tune.TUNE_FORMAT and data["config"] == tiny_cfg.to_dict()
    rows = {r["backend"]: r for r in data["rows"]}
    assert set(rows) == {"torch", "torch-bf16"}
    assert rows["torch"]["mask_iou"] == 1.0 and rows["torch"]["meets"] == ["exact", "fast"]
    assert rows["torch"]["speedup_vs_torch"] == 1.0 and rows["torch-bf16"]["episode_ms"] > 0
    assert "exact" not in rows["torch-bf16"]["meets"]  # bf16 is never exact
    assert "| torch | exact |" in out and f"wrote {files[0]}" in out
    assert "auto: torch (exact:" in out
    name, why = tune.choose(tiny_cfg, "cpu", "exact")
    assert name == "torch" and "mask IoU 1.0000" in why and str(files[0]) in why
    assert not [p for p in (cache / "tune").iterdir() if p.name.startswith(".")], "temporary file left"


def test_choose_by_engine_dir_and_accuracy(cache, tiny_cfg, tiny_graphs):
    fake_tune(tiny_cfg, [
        {"backend": "torch", "episode_ms": 1000.0, "mask_iou": 1.0},
        {"backend": "torch-bf16", "episode_ms": 400.0, "mask_iou": 0.99, "accuracy": "fast", "precision": "bf16"},
        {"backend": "onnxruntime", "episode_ms": 600.0, "mask_iou": 1.0, "engine_format": "fssam-onnx/1"},
        {"backend": "onnxruntime-int8", "episode_ms": 300.0, "mask_iou": 0.985, "accuracy": "fast",
         "precision": "int8", "engine_format": "fssam-onnx/1"},
        {"backend": "openvino", "error": "EngineError: boom"},
    ])
    name, why = tune.choose(tiny_cfg, "cpu", "exact")
    assert name == "torch" and "faster with other artifacts: onnxruntime (600 ms, from `fssam export`)" in why
    assert tune.choose(tiny_cfg, "cpu", "fast")[0] == "torch-bf16"
    assert tune.choose(tiny_cfg, "cpu", "exact", engine_dir=str(tiny_graphs))[0] == "onnxruntime"
    # fp32 graphs: onnxruntime-int8 (faster, fast) cannot load them as they are, so fast also gets onnxruntime
    assert tune.choose(tiny_cfg, "cpu", "fast", engine_dir=str(tiny_graphs))[0] == "onnxruntime"
    assert tune.choose_precision(tiny_cfg, "cpu", "fast", "fssam-onnx/1")[0] == "int8"
    assert tune.choose_precision(tiny_cfg, "cpu", "exact", "fssam-onnx/1")[0] == "fp32"
    with pytest.raises(ConfigError, match="no tuned backend of these artifacts"):
        tune.choose_precision(tiny_cfg, "cpu", "exact", "fssam-openvino/1")
    with pytest.raises(ConfigError, match=r"--accuracy 'best': choose from \['exact', 'fast'\]"):
        tune.choose(tiny_cfg, "cpu", "best")


def test_pick_names_a_slow_first_episode(cache, tiny_cfg):
    """A backend that compiles when it loads (torch-compile-bf16: minutes on a CPU) is picked by its steady episode
    time, and the reason says what its first episode cost."""
    fake_tune(tiny_cfg, [
        {"backend": "torch", "episode_ms": 1000.0, "mask_iou": 1.0, "first_episode_ms": 1100.0},
        {"backend": "torch-compile-bf16", "episode_ms": 250.0, "mask_iou": 0.99, "accuracy": "fast",
         "precision": "bf16", "first_episode_ms": 109_000.0},
    ])
    name, why = tune.choose(tiny_cfg, "cpu", "fast")
    assert name == "torch-compile-bf16" and "first episode after loading took 109 s here (compilation)" in why
    assert "first episode" not in tune.choose(tiny_cfg, "cpu", "exact")[1]
    assert "| 109.0 |" in tune.tune_table(json.loads(tune.tune_path(tiny_cfg, "cpu").read_text()))


def test_run_auto_uses_the_pick(cache, tiny_cfg, tiny_graphs, tmp_path, capsys):
    """`fssam run --backend auto --engine-dir GRAPHS` runs onnxruntime and writes what `--backend onnxruntime` does."""
    fake_tune(tiny_cfg, [{"backend": "torch", "episode_ms": 1000.0, "mask_iou": 1.0},
                         {"backend": "onnxruntime", "episode_ms": 600.0, "mask_iou": 1.0,
                          "engine_format": "fssam-onnx/1"}])
    q, _, sups, masks = synthetic_episode(256, shots=1, seed=3)
    Image.fromarray(q).save(tmp_path / "q.png")
    Image.fromarray(sups[0]).save(tmp_path / "s.png")
    Image.fromarray((masks[0] * 255).astype(np.uint8)).save(tmp_path / "m.png")
    common = ["run", *TINY_FLAGS, "--query", str(tmp_path / "q.png"), "--support", str(tmp_path / "s.png"),
              "--support-mask", str(tmp_path / "m.png"), "--engine-dir", str(tiny_graphs)]
    assert main([*common, "--backend", "auto", "--out", str(tmp_path / "auto.png"),
                 "--logits", str(tmp_path / "auto.npy")]) == 0
    err = capsys.readouterr()
    assert "auto: onnxruntime (exact: 600 ms per episode" in err.err and "onnxruntime on cpu" in err.out
    assert main([*common, "--backend", "onnxruntime", "--out", str(tmp_path / "ort.png"),
                 "--logits", str(tmp_path / "ort.npy")]) == 0
    assert np.array_equal(np.load(tmp_path / "auto.npy"), np.load(tmp_path / "ort.npy"))


def test_auto_untuned_is_one_error_line(cache, tmp_path, capsys):
    rc = main(["run", *TINY_FLAGS, "--backend", "auto", "--query", str(tmp_path / "q.png"), "--support",
               str(tmp_path / "s.png"), "--support-mask", str(tmp_path / "m.png"), "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith("error: --backend auto: this machine has not been tuned") and \
        "run `fssam tune --sam2-config sam2_hiera_t --dino dinov2_vits14 --image-size 256 --shots 1 --device cpu`" \
        in err[0]
    rc = main(["export", *TINY_FLAGS, "--precision", "auto", "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: --precision auto: this machine has not been "
                                                            "tuned"), err
    assert not (tmp_path / "g").exists() and not cache.exists()


def test_compiled_bf16_left_out_where_bf16_is_emulated(cache, tiny_cfg, monkeypatch):
    """By default tune does not compile bf16 (minutes) on a CPU without native bf16 (no AVX512-BF16 / AMX-BF16)
    where eager bf16 also ran slower than fp32 (an AVX2 EPYC ran it 7x slower); the row says why and is never
    picked. With native bf16, or when eager bf16 was fast, or named in --backends, it is measured."""
    from fssam_deploy import hostinfo
    from fssam_deploy.bench import run as bench_run

    order = tune.default_backends("cpu")
    assert order.index("torch") < order.index("torch-bf16") < order.index("torch-compile-bf16")  # measured first
    ran, ms = [], {"torch": 100.0, "torch-bf16": 700.0, "torch-compile-bf16": 50.0}

    def fake_bench(st, progress=True):
        name = st.backends[0]
        ran.append(name)
        return {"rows": [{"episode": {"median_ms": ms[name]}, "cached_query": {"median_ms": 1.0}, "mask_iou": 0.99,
                          "max_abs_logit_err": 0.0, "ref_abs_max": 1.0}]}

    info = hostinfo.cpu_info()
    flags = {"avx512_bf16": False, "amx_bf16": False}
    monkeypatch.setattr(hostinfo, "cpu_info", lambda: {**info, "features": {**info["features"], **flags}})
    monkeypatch.setattr(bench_run, "run_bench", fake_bench)
    monkeypatch.setattr(tune, "default_backends", lambda d: ["torch", "torch-bf16", "torch-compile-bf16"])
    lines = []
    rows = {r["backend"]: r for r in tune.run_tune(tiny_cfg, on_row=lines.append)["rows"]}
    assert ran == ["torch", "torch-bf16"] and rows["torch-compile-bf16"]["meets"] == []
    assert rows["torch-compile-bf16"]["skipped"] == ("no native bf16 on this CPU (no AVX512-BF16, no AMX-BF16) and "
                                                     "eager bf16 ran slower than fp32 (700 vs 100 ms per episode)")
    assert lines[-1].endswith("name it in --backends to measure it anyway")
    assert tune.choose(tiny_cfg, "cpu", "fast")[0] == "torch"  # 700 ms bf16 is slower; the skipped row never wins
    assert "| torch-compile-bf16 | fast | skipped: no native bf16 on this CPU" in tune.tune_table(
        json.loads(tune.tune_path(tiny_cfg, "cpu").read_text()))
    for change in ({"ms": 60.0}, {"amx_bf16": True}, {"backends": ["torch", "torch-bf16", "torch-compile-bf16"]}):
        ms["torch-bf16"] = change.get("ms", 700.0)
        flags["amx_bf16"] = change.get("amx_bf16", False)
        ran.clear()
        tune.run_tune(tiny_cfg, backends=change.get("backends"))
        assert ran == ["torch", "torch-bf16", "torch-compile-bf16"], change
