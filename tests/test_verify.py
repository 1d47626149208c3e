"""verify: per-graph errors from Polygraphy, targets by the manifest's precision (tiny config, refinement graphs)."""

from __future__ import annotations

import copy
import json
import math
import shutil
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fssam_deploy.backends.pytorch import TorchRunner, torch_runners
from fssam_deploy.errors import EngineError, InputError
from fssam_deploy.model import build_stages, random_weights
from fssam_deploy.onnx.export import export_onnx
from fssam_deploy.onnx.polygraphy_compare import compare_graph
from fssam_deploy.parity import StageTolerance, share_off
from fssam_deploy.stages import STAGE_SPECS, stage_module
from fssam_deploy.verify import TARGETS, VerifyReport, verify, verify_runner, verify_stage

STAGE = "refinement"  # the cheapest graph to export, and all min-max / cosine maths


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, tiny_cfg):
    """{precision: path of the refinement graph}, static batch 1."""
    root = tmp_path_factory.mktemp("verify")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dirs = {p: export_onnx(tiny_cfg, root / p, seed=0, precision=p, stages=[STAGE], progress=False)
                for p in ("fp32", "fp16")}
    return {p: d / f"{STAGE}.onnx" for p, d in dirs.items()}


@pytest.fixture(scope="module")
def module(tiny_cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stage_module(build_stages(random_weights(tiny_cfg, 0), attention_backend="torch"), STAGE)


def torch_and_ort(path, module, feed):
    with torch.inference_mode():
        ref = module(*feed.values()).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: feed[i.name].numpy() for i in sess.get_inputs()})[0]
    return ref, got


def test_polygraphy_errors_and_verdicts(graphs, module, tiny_cfg):
    spec = STAGE_SPECS[STAGE]
    feed = spec.dummy_inputs(tiny_cfg, 1, 1, seed=2)
    ref, got = torch_and_ort(graphs["fp16"], module, feed)
    exact = float(np.abs(got - ref).max())
    assert exact > 0
    feed_np = {k: v.numpy() for k, v in feed.items()}
    errors, seconds = compare_graph(graphs["fp16"], feed_np, {"query_memory": ref}, {"query_memory": 2 * exact})
    e = errors["query_memory"]
    assert e.max_abs == pytest.approx(exact, rel=1e-6) and e.passed and seconds > 0
    errors, _ = compare_graph(graphs["fp16"], feed_np, {"query_memory": ref}, {"query_memory": exact / 2})
    assert not errors["query_memory"].passed
    bad = ref.copy()
    bad[0, 0, 0, 0] = np.nan
    errors, _ = compare_graph(graphs["fp16"], feed_np, {"query_memory": bad}, {"query_memory": math.inf})
    assert math.isnan(errors["query_memory"].max_abs)


def test_missing_input_names_the_graph(graphs, tiny_cfg):
    feed = {k: v.numpy() for k, v in STAGE_SPECS[STAGE].dummy_inputs(tiny_cfg, 1, 1).items() if k != "prior_ae"}
    with pytest.raises(InputError, match=r"refinement.onnx: graph inputs \['prior_ae'\] are not in the feed"):
        compare_graph(graphs["fp32"], feed, {"query_memory": np.zeros((1, 64, 16, 16), np.float32)}, {"": 1.0})


def test_batch_larger_than_the_static_graph(graphs, module, tiny_cfg):
    spec = STAGE_SPECS[STAGE]
    rows = verify_stage(graphs["fp32"], spec, module, tiny_cfg, TARGETS["fp32"], batch=3, seed=1, reps=1)
    assert [r["output"] for r in rows] == ["query_memory"] and rows[0]["ok"]  # Polygraphy: 3 iterations of batch 1
    assert rows[0]["rel"] <= 1e-4 and rows[0]["target"] == "<= 1e-04 x scale"


def test_targets_follow_the_precision(graphs, module, tiny_cfg):
    spec = STAGE_SPECS[STAGE]
    fp16 = verify_stage(graphs["fp16"], spec, module, tiny_cfg, TARGETS["fp16"], batch=1, seed=0, reps=1)[0]
    assert fp16["ok"] and fp16["target"] == "finite" and 1e-4 < fp16["rel"] < 5e-3  # fp16: ~3e-4 x scale
    strict = verify_stage(graphs["fp16"], spec, module, tiny_cfg, TARGETS["fp32"], batch=1, seed=0, reps=1)[0]
    assert not strict["ok"]  # the same graph fails the fp32 target
    fp16_t, fp32_t = TARGETS["fp16"], TARGETS["fp32"]
    assert fp16_t.episode_ok(0.5, 0.995) and not fp16_t.episode_ok(0.5, 0.98) and not fp16_t.episode_ok(math.nan, 1)
    assert fp32_t.episode_ok(5e-4, 0.9995) and not fp32_t.episode_ok(2e-3, 1.0) and not fp32_t.episode_ok(0, 0.998)
    assert not fp16_t.stage_ok(math.inf, True) and fp16_t.stage_ok(1.0, False) and not fp32_t.stage_ok(1e-9, False)


def test_report_table_and_json():
    row = {"stage": STAGE, "output": "query_memory", "max_abs": 1e-3, "max_rel": 0.5, "scale": 4.0, "rel": 2.5e-4,
           "tol": None, "target": "finite", "ok": True, "torch_ms": 1.0, "ort_ms": 2.0}
    episode = {"max_abs": 1e-3, "scale": 0.2, "iou": 0.995, "torch_ms": 3.0, "ort_ms": 4.0, "target": "IoU >= 0.99",
               "ok": True}
    report = VerifyReport("fp16", [row], episode)
    assert report.passed and json.loads(json.dumps(report.to_dict()))["precision"] == "fp16"
    table = report.table()
    assert "precision fp16" in table
    assert "| refinement | query_memory | 1.00e-03 | 4 | 2.50e-04 | 5.00e-01 | finite | 1.0 | 2.0 | yes |" in table
    assert "(mask IoU 0.99500)" in table
    assert not VerifyReport("fp16", [{**row, "ok": False}], episode).passed


def test_unknown_precision_is_refused(graphs, tmp_path):
    """A manifest of another precision (e.g. a newer exporter's) is refused before anything runs."""
    src = graphs["fp32"].parent
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["precision"] = "int4"
    for name in STAGE_SPECS:  # read_manifest wants every stage's file; verify must stop before using them
        manifest["stages"][name] = {**manifest["stages"][STAGE], "file": f"{STAGE}.onnx"}
    shutil.copy(graphs["fp32"], tmp_path / f"{STAGE}.onnx")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match=r"manifest.json: precision 'int4' has no verify targets; known: \['fp32', "):
        verify(tmp_path)


def _rounded(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def test_bf16_rounded_rule():
    """One rule for the memory: a few elements one bf16 step away pass; a dropped rounding, a share of them off,
    two steps off or a NaN fail; fp32 outputs stay elementwise."""
    x = torch.randn(4, 64, 16, 16, generator=torch.Generator().manual_seed(0))
    want = _rounded(x)
    rule = StageTolerance(1e-4, bf16_rounded=True)
    assert rule.check(want, want) == {"max_abs": 0.0, "scale": want.abs().max().item(), "off": 0.0, "ok": True}
    step = torch.finfo(torch.bfloat16).eps * want.abs()  # one bf16 step at each element: 2^-7 x its binade
    big = want.abs().flatten().argsort(descending=True)  # where one step is well above 1e-4 x scale
    flipped = want.clone().flatten()
    flipped[big[:50]] += step.flatten()[big[:50]]  # 50 of 65536: 0.08%
    assert rule.check(flipped.view_as(want), want)["ok"]
    more = want.clone().flatten()
    more[big[:100]] += step.flatten()[big[:100]]  # 0.15%: more than inputs near a boundary explain
    c = rule.check(more.view_as(want), want)
    assert not c["ok"] and c["off"] == pytest.approx(100 / want.numel())
    dropped = rule.check(x, want)  # the memory without its rounding: almost every element off, each < one step
    assert not dropped["ok"] and dropped["off"] > 0.5 and dropped["max_abs"] <= 2.0**-7 * dropped["scale"]
    two = want.clone().flatten()
    two[0] += 2 * 2.0**-7 * want.abs().max()
    assert not rule.check(two.view_as(want), want)["ok"]
    nan = want.clone().flatten()
    nan[0] = math.nan
    assert not rule.check(nan.view_as(want), want)["ok"]
    assert StageTolerance(1e-4).check(flipped.view_as(want), want)["ok"] is False  # fp32: every element
    assert StageTolerance(1e-4).check(want + 1e-5, want)["off"] is None
    wrong = rule.check(want[:2], want)  # another shape fails, never broadcasts
    assert not wrong["ok"] and math.isnan(wrong["max_abs"])
    with pytest.raises(ValueError, match="shapes differ"):
        share_off(want[:1], want, 1e-4)
    with pytest.raises(ValueError, match="pass `off`"):
        rule.ok(0.0, 1.0)
    assert STAGE_SPECS["memory_encoder"].output("memory").bf16_rounded
    assert [t.name for s in STAGE_SPECS.values() for t in s.outputs if t.bf16_rounded] == ["memory"]


def test_verify_fails_a_runner_that_drops_the_memory_rounding(tiny_pipeline, tiny_cfg):
    """`fssam verify`'s runner check: the memory encoder without its bf16 rounding is off by less than one bf16
    step everywhere, which a max-error bound of one step would pass; the share rule fails it, and names it."""
    spec, stages = STAGE_SPECS["memory_encoder"], tiny_pipeline.stages
    good = torch_runners(stages, tiny_cfg)["memory_encoder"]
    unrounded = copy.deepcopy(stages.memory_encoder)
    unrounded.bf16_round = False
    bad = TorchRunner(unrounded, spec, good.input_shapes)
    rows = {}
    for name, runner in (("good", good), ("bad", bad)):
        with runner:
            rows[name] = {r["output"]: r for r in verify_runner(runner, spec, stages.memory_encoder, tiny_cfg,
                                                                TARGETS["fp32"], batch=2, seed=3)}
    assert rows["good"]["memory"]["ok"] and rows["good"]["memory"]["off"] == 0.0
    mem = rows["bad"]["memory"]
    assert not mem["ok"] and mem["off"] > 0.1 and mem["rel"] <= 2.0**-7, mem
    assert rows["bad"]["obj_ptr"]["off"] is None
    table = VerifyReport("fp32", list(rows["bad"].values()), {}, backend="torch").table()
    assert "| memory_encoder | memory |" in table and f"| NO ({mem['off']:.2%} of elements off) |" in table
    assert "< 0.1% of elements, all <= 2^-7 x scale" in table


def test_polygraphy_stage_check_reads_the_rounding(tiny_graphs, tiny_pipeline, tiny_cfg):
    """The ONNX path: the exported memory encoder (rounding kept) passes against the PyTorch stage, and fails
    against a reference without the rounding, through the share Polygraphy's outputs give."""
    spec, stages = STAGE_SPECS["memory_encoder"], tiny_pipeline.stages
    path = tiny_graphs / "memory_encoder.onnx"
    ok = {r["output"]: r for r in verify_stage(path, spec, stages.memory_encoder, tiny_cfg, TARGETS["fp32"],
                                               batch=2, seed=4, reps=1)}
    assert ok["memory"]["ok"] and ok["memory"]["off"] < 1e-3 and ok["obj_ptr"]["ok"], ok
    unrounded = copy.deepcopy(stages.memory_encoder)
    unrounded.bf16_round = False
    bad = {r["output"]: r for r in verify_stage(path, spec, unrounded, tiny_cfg, TARGETS["fp32"], batch=2, seed=4,
                                                reps=1)}
    assert not bad["memory"]["ok"] and bad["memory"]["off"] > 0.1, bad["memory"]
    assert bad["memory"]["rel"] <= 2.0**-7  # within one step: only the share tells
