"""The TensorRT path, checked without TensorRT or a GPU (tiny config).

The parser's operator list against every exported graph; the plugin variant of the decoder (one
custom node per calibrated attention, everything else standard); engine profiles (against the
batches an episode really feeds each stage); the engine manifest's staleness checks; the timing
cache key; the precision plan; the plugin's pure functions, its kernel in TensorRT's argument
order (interpreted on a CPU) and its PTX signature. About 2 minutes on 2 CPU cores, most of it the
ONNX export of the tiny config (the fp16 graphs add ~2.5 min: opt-in with FSSAM_TRT_FP16_OPS=1).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from fssam_deploy.backends.base import Runner
from fssam_deploy.backends.tensorrt import plugin as tp
from fssam_deploy.backends.tensorrt.build import typing_plan
from fssam_deploy.backends.tensorrt.manifest import (
    ENGINE_MANIFEST,
    BuildSettings,
    batch_range,
    build_manifest,
    check_engine,
    check_timing_cache,
    read_trt_manifest,
    stage_profile,
    timing_cache_key,
    write_timing_cache_key,
)
from fssam_deploy.backends.tensorrt.ops import (
    check_trt_ops,
    initializer_violations,
    supported_trt_ops,
    trt_op_table,
    type_violations,
    unsupported_trt_ops,
)
from fssam_deploy.episode import Episode
from fssam_deploy.errors import BackendUnavailableError, ConfigError, EngineError, InputError
from fssam_deploy.kernels.reference import calibrated_attention_reference
from fssam_deploy.model import build_stages, random_weights
from fssam_deploy.model.checkpoint import file_sha256
from fssam_deploy.onnx.export import export_onnx
from fssam_deploy.onnx.plugin_variant import (
    CUSTOM_NODE,
    custom_nodes,
    expected_custom_nodes,
    export_plugin_variants,
    plugin_stage_names,
    read_plugin_variants,
)
from fssam_deploy.stages import STAGE_SPECS, stage_module
from tests.helpers import make_episode

REPO = Path(__file__).resolve().parents[2]
HERE = {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "tensorrt": "10.13.0.35"}


@pytest.fixture(scope="module")
def op_stages(tiny_cfg):
    return build_stages(random_weights(tiny_cfg, 0), attention_backend="op")


# ------------------------------------------------------------------------------ the parser's op list



@pytest.fixture(scope="module")
def graphs(tiny_graphs):
    """The session's tiny graphs (with the decoder's plugin variant)."""
    return tiny_graphs

def test_op_table_is_packaged_with_its_source():
    assert resources.files("fssam_deploy.backends.tensorrt").joinpath("data/trt_onnx_ops.json").is_file()
    t = trt_op_table()
    assert re.fullmatch(r"[0-9a-f]{40}", t["commit"]) and t["commit"] in t["source"]
    assert t["source"].startswith("https://github.com/onnx/onnx-tensorrt/") and t["commit_date"] and t["recorded"]
    assert {"MatMul", "Softmax", "LayerNormalization", "Conv", "Einsum", "Resize"} <= supported_trt_ops()
    assert "Unique" in t["unsupported"] and not set(t["unsupported"]) & supported_trt_ops()


def _save(tmp_path, nodes, inputs, outputs, opset=18, initializers=(), name="m.onnx"):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("x", 1)])
    onnx.save(model, tmp_path / name)
    return tmp_path / name


def test_unsupported_ops_in_subgraphs_custom_domains_and_opset(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    branch = lambda op, out: helper.make_graph(  # noqa: E731
        [helper.make_node(op, ["x"], [out])], op, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
    nodes = [helper.make_node("If", ["cond"], ["y0"], then_branch=branch("Unique", "u"),
                              else_branch=branch("Relu", "r")),
             helper.make_node("Foo", ["y0"], ["y"], domain="x")]
    path = _save(tmp_path, nodes, [x, cond], [y])
    assert unsupported_trt_ops(path) == ["Unique", "x::Foo"]
    assert unsupported_trt_ops(path, frozenset({("x", "Foo")})) == ["Unique"]
    relu = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [x], [y], opset=trt_op_table()["opset_max"] + 1,
                 name="relu.onnx")
    assert unsupported_trt_ops(relu) == [f"opset:{trt_op_table()['opset_max'] + 1}"]
    with pytest.raises(EngineError, match=r"m\.onnx.*'Unique', 'x::Foo'"):
        check_trt_ops(path)


def test_initializer_restrictions(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    ints = lambda name, vals: helper.make_tensor(name, TensorProto.INT64, [len(vals)], vals)  # noqa: E731
    init = [ints("starts", [0]), ints("ends", [2]), ints("axes", [1])]
    fixed = _save(tmp_path, [helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"], name="s")], [x], [y],
                  initializers=init, name="fixed.onnx")
    assert initializer_violations(fixed) == []
    computed = [helper.make_node("Shape", ["x"], ["shape"]),
                helper.make_node("Slice", ["shape", "starts", "ends"], ["axes_c"]),
                helper.make_node("Slice", ["x", "starts", "ends", "axes_c"], ["y"], name="s2")]
    bad = _save(tmp_path, computed, [x], [y], initializers=init[:2], name="bad.onnx")
    assert initializer_violations(bad) == ["s2 (Slice): input `axes` is computed ('axes_c')"]


def test_exported_graphs_use_only_parser_ops(graphs):
    manifest = json.loads((graphs / "manifest.json").read_text())
    assert set(manifest["stages"]) == set(STAGE_SPECS)
    for name, entry in manifest["stages"].items():
        path = graphs / entry["file"]
        assert unsupported_trt_ops(path) == [], name
        assert initializer_violations(path) == [] and type_violations(path) == [], name


def test_exported_fp16_graphs_use_only_parser_ops(tmp_path, tiny_cfg):
    out = export_onnx(tiny_cfg, tmp_path / "fp16", seed=0, batch="dynamic", precision="fp16", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "fp16" and set(manifest["stages"]) == set(STAGE_SPECS)
    for name, entry in manifest["stages"].items():
        path = out / entry["file"]
        assert unsupported_trt_ops(path) == [] and initializer_violations(path) == [], name
        assert type_violations(path) == [], name


# ------------------------------------------------------------------------------ the plugin variant


def _shape(model, name):
    vals = {v.name: v for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    dims = vals[name].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)


def test_plugin_variant_has_one_custom_node_per_calibrated_attention(graphs, op_stages, tiny_cfg):
    variants = read_plugin_variants(graphs)
    assert sorted(variants["stages"]) == plugin_stage_names(op_stages) == ["decoder"]
    entry = variants["stages"]["decoder"]
    assert file_sha256(graphs / entry["file"]) == entry["sha256"]
    layers = len(op_stages.decoder.attention.ma.layers)
    assert expected_custom_nodes(op_stages.decoder) == layers == entry["custom_nodes"] == 4
    model = onnx.load(str(graphs / entry["file"]))
    standard = onnx.load(str(graphs / "decoder.onnx"))
    nodes = custom_nodes(model)
    assert len(nodes) == layers and custom_nodes(standard) == []
    # the custom node replaced exactly the calibrated attention: one softmax less per layer
    count = lambda m, op: sum(n.op_type == op for n in m.graph.node)  # noqa: E731
    assert count(model, "Softmax") == count(standard, "Softmax") - layers
    # nothing else is custom: no ATen fallback, no local function, every other op on the parser's list
    assert not model.functions and unsupported_trt_ops(graphs / entry["file"], frozenset({CUSTOM_NODE})) == []
    assert type_violations(graphs / entry["file"], frozenset({CUSTOM_NODE})) == []
    n = tiny_cfg.feat_size**2
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"n_sup": n, "n_qry": n, "plugin_namespace": b"fssam", "aot": 1}
        q, k, v, c = (_shape(model, i) for i in node.input)
        assert tp.output_shape(q, k, v, c, n, n) == q == _shape(model, node.output[0])
        assert q[1:] == (1, n, 256) and k[2] == 2 * n + 8  # 1-shot: support, query frames and 8 pointer tokens


def test_verify_runs_the_plugin_variant_with_the_kernels_reference(graphs, tiny_cfg):
    from fssam_deploy.verify import TARGETS, verify_variant

    spec, path = STAGE_SPECS["decoder"], graphs / "decoder.plugin.onnx"
    stages = {s: build_stages(random_weights(tiny_cfg, s), attention_backend="torch") for s in (0, 1)}
    (row,) = verify_variant(path, spec, stage_module(stages[0], "decoder"), tiny_cfg, TARGETS["fp32"], 2, 3)
    assert row["ok"] and row["rel"] < 1e-5 and "plugin variant" in row["stage"]
    (other,) = verify_variant(path, spec, stage_module(stages[1], "decoder"), tiny_cfg, TARGETS["fp32"], 2, 3)
    assert not other["ok"]  # other weights: the comparison can fail


def test_onnxruntime_cannot_run_the_plugin_variant(graphs):
    import onnxruntime as ort

    with pytest.raises(Exception, match="CalibratedAttention"):
        ort.InferenceSession(str(graphs / "decoder.plugin.onnx"), providers=["CPUExecutionProvider"])


def test_plugin_variants_refuse_other_weights_int8_graphs_and_other_precisions(graphs, tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="weights random:0.*random:1"):
        export_plugin_variants(tiny_cfg, graphs, seed=1)
    manifest = json.loads((graphs / "manifest.json").read_text())

    def relabelled(precision):  # the same files under a manifest that claims another precision
        d = tmp_path / precision
        d.mkdir()
        for f in graphs.iterdir():
            if f.name != "manifest.json":
                (d / f.name).symlink_to(f)
        (d / "manifest.json").write_text(json.dumps({**manifest, "precision": precision}))
        return d

    with pytest.raises(ConfigError, match=r"precision 'int8'.*TensorRT graphs \['fp32', 'fp16', 'bf16'\]"):
        export_plugin_variants(tiny_cfg, relabelled("int8"), seed=0)
    with pytest.raises(EngineError, match="precision fp32 vs fp16.*export them again"):
        read_plugin_variants(relabelled("fp16"))  # fp32 variants beside fp16 graphs
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="no plugin variants.*--no-plugin"):
        read_plugin_variants(tmp_path / "empty")


# ------------------------------------------------------------------------------------- profiles


def test_batch_range_rules():
    me, ie, ref = STAGE_SPECS["memory_encoder"], STAGE_SPECS["image_encoder"], STAGE_SPECS["refinement"]
    assert batch_range(me, (1, 2, 4), 5) == (2, 14, 28)  # min(B*K, 2B) .. B*K + 2B
    assert batch_range(me, (1, 2, 4), 1) == (1, 6, 12)
    assert batch_range(ie, (1, 2, 4), 5) == (1, 10, 20)  # one image per query .. B*K support images
    assert batch_range(ref, (1, 2, 4), 5) == (1, 2, 4)


class _ShapeRecorder(Runner):
    """Returns zeros of the spec's output shapes and records the batch of every call (no model runs)."""

    def __init__(self, spec, cfg, calls):
        super().__init__()
        self.spec, self.cfg, self.calls, self.name = spec, cfg, calls, f"recorder:{spec.name}"
        self.input_shapes = {t.name: tuple(None if isinstance(d, str) and d in "BMK" else n
                                           for d, n in zip(t.shape, t.concrete(cfg, 1, 1))) for t in spec.inputs}

    def infer_impl(self, feed):
        n = feed[self.spec.input_names[0]].shape[0]
        self.calls.setdefault(self.spec.name, set()).add(n)
        return {t.name: torch.zeros(t.concrete(self.cfg, n, self.cfg.shots)) for t in self.spec.outputs}


@pytest.mark.parametrize("shots", [1, 5])
def test_profiles_cover_every_call_an_episode_makes(tiny_cfg, shots):
    cfg = tiny_cfg.replace(shots=shots)
    calls = {}
    episode = Episode({n: _ShapeRecorder(s, cfg, calls) for n, s in STAGE_SPECS.items()}, cfg, "cpu")
    batch = (1, 2, 4)
    for b in batch:
        q, sx, sy = make_episode(cfg, batch=b, shots=shots, seed=b)
        episode.segment(q, sx, sy)
        episode.with_supports(sx[:1], sy[:1]).segment(q)  # one support set shared by b queries
    assert set(calls) == set(STAGE_SPECS)
    for name, seen in calls.items():
        lo, opt, hi = batch_range(STAGE_SPECS[name], batch, shots)
        assert lo <= min(seen) and max(seen) <= hi, (name, sorted(seen), (lo, opt, hi))
        assert lo <= opt <= hi


def test_stage_profiles_from_the_exported_manifest(graphs, tiny_cfg):
    manifest = json.loads((graphs / "manifest.json").read_text())
    for name, entry in manifest["stages"].items():
        prof = stage_profile(STAGE_SPECS[name], entry["inputs"], (1, 2, 4), tiny_cfg.shots)
        assert list(prof) == [i["name"] for i in entry["inputs"]]
        lo, opt, hi = batch_range(STAGE_SPECS[name], (1, 2, 4), tiny_cfg.shots)
        for i in entry["inputs"]:
            p = prof[i["name"]]
            assert (p["min"][0], p["opt"][0], p["max"][0]) == (lo, opt, hi)
            assert p["min"][1:] == p["opt"][1:] == p["max"][1:] == i["shape"][1:]


def test_stage_profile_static_and_symbolic_dims():
    spec = STAGE_SPECS["refinement"]
    prof = stage_profile(spec, [{"name": "prior_fg", "shape": [1, 1, 64, 64]}], (1, 1, 1), 1)
    assert prof == {"prior_fg": {"min": [1, 1, 64, 64], "opt": [1, 1, 64, 64], "max": [1, 1, 64, 64]}}
    with pytest.raises(EngineError, match=r"'prior_fg': shape \['batch', 1, 'S', 64\] has symbolic dims \[\(2, 'S'\)"):
        stage_profile(spec, [{"name": "prior_fg", "shape": ["batch", 1, "S", 64]}], (1, 2, 4), 1)


# --------------------------------------------------------------------- build settings and typing


def test_build_settings_command_and_validation(tmp_path):
    s = BuildSettings(str(tmp_path / "graphs dir"), "/e", "fp16", (1, 2, 8), "/c.cache", 4.0, plugin=False)
    assert s.command() == (f"fssam build --format tensorrt --onnx-dir '{tmp_path}/graphs dir' --out /e "
                           "--precision fp16 --batch 1,2,8 --timing-cache /c.cache --workspace 4 --no-plugin")
    assert BuildSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(ConfigError, match=r"1 <= min <= opt <= max, got \(2, 1, 4\)"):
        BuildSettings("/g", "/e", batch=(2, 1, 4))
    with pytest.raises(ConfigError, match="precision 'int4'"):
        BuildSettings("/g", "/e", precision="int4")


def test_engines_are_strongly_typed_from_graphs_of_their_precision(graphs, tmp_path, monkeypatch):
    from fssam_deploy.backends.tensorrt import build as tb

    assert typing_plan("fp32", "fp32") == typing_plan("fp16", "fp16") == {"strongly_typed": True}
    with pytest.raises(EngineError, match="graphs exported in fp32 cannot give fp16 engines.*on 10 it would run "
                       "LayerNorm.*fssam export --precision fp16"):
        typing_plan("fp16", "fp32")
    with pytest.raises(EngineError, match="graphs exported in fp16 cannot give fp32 engines"):
        typing_plan("fp32", "fp16")
    # checked before TensorRT is needed, and nothing is written
    with pytest.raises(EngineError, match="graphs exported in fp32 cannot give bf16 engines"):
        tb.build_tensorrt(graphs, tmp_path / "engines", precision="bf16", batch=(1, 2, 4))
    assert not list(tmp_path.iterdir())
    assert tb.version_tuple("10.13.0.35") == (10, 13) and tb.version_tuple("11.0") == (11, 0)
    with pytest.raises(EngineError, match="cannot read the TensorRT version 'x'"):
        tb.version_tuple("x")
    with pytest.raises(BackendUnavailableError, match=r"TensorRT 10.8.0 has no ahead-of-time.*10.9\+.*--no-plugin"):
        tb._plugin_setup(graphs, True, {"tensorrt": "10.8.0", "aot_plugins": False})
    assert tb._plugin_setup(graphs, False, {"tensorrt": "10.8.0", "aot_plugins": False}) == (None, None)


def test_timing_cache_key(tmp_path):
    key = timing_cache_key(HERE, "fp32", "abc")
    assert key["id"] != timing_cache_key(HERE, "fp32", "abd")["id"]  # the plugin kernel changed
    assert key["id"] != timing_cache_key({**HERE, "tensorrt": "11.0"}, "fp32", "abc")["id"]
    cache = tmp_path / "t.cache"
    check_timing_cache(cache, key)  # absent: fine
    cache.write_bytes(b"timings")
    with pytest.raises(EngineError, match="unknown origin"):
        check_timing_cache(cache, key)
    write_timing_cache_key(cache, key)
    check_timing_cache(cache, key)
    with pytest.raises(EngineError, match=r"another build .*'plugin_kernel_sha256': \('abc', 'xyz'\)"):
        check_timing_cache(cache, timing_cache_key(HERE, "fp32", "xyz"))


# ------------------------------------------------------------------------- manifest and staleness


@pytest.fixture
def engine_dir(tmp_path, tiny_cfg):
    """A fake engine folder built 'from' a fake ONNX folder (one stage), as build_tensorrt writes them."""
    onnx_dir, out = tmp_path / "graphs", tmp_path / "engines"
    onnx_dir.mkdir()
    out.mkdir()
    onnx_manifest = {"config": tiny_cfg.to_dict(), "weights": "random:0", "opset": 18, "batch": "dynamic",
                     "precision": "fp32", "stages": {"decoder": {"file": "decoder.onnx", "sha256": "aa" * 32}}}
    (onnx_dir / "manifest.json").write_text(json.dumps(onnx_manifest))
    (out / "decoder.engine").write_bytes(b"engine bytes")
    settings = BuildSettings(str(onnx_dir), str(out), batch=(1, 2, 4), plugin=False)
    stages = {"decoder": {"file": "decoder.engine", "sha256": file_sha256(out / "decoder.engine"),
                          "onnx_file": "decoder.onnx", "onnx_sha256": "aa" * 32, "plugin": False}}
    doc = build_manifest(tiny_cfg, settings, HERE, stages, onnx_manifest, {"torch": torch.__version__}, None)
    (out / ENGINE_MANIFEST).write_text(json.dumps(doc))
    return out


def test_manifest_accepts_same_platform(engine_dir, tiny_cfg):
    m = read_trt_manifest(engine_dir, tiny_cfg, here=HERE)
    assert m["rebuild"].startswith("fssam build --format tensorrt --onnx-dir ")
    assert check_engine(engine_dir, m, "decoder") == engine_dir / "decoder.engine"


@pytest.mark.parametrize("field, value, match", [
    ("gpu", "NVIDIA A100-SXM4-80GB", r"built on GPU 'NVIDIA H100 80GB HBM3' \(sm 9.0\), this is 'NVIDIA A100"),
    ("capability", "8.0", r"\(sm 9.0\), this is .*\(sm 8.0\)"),
    ("tensorrt", "11.0.0", r"built with TensorRT 10.13.0.35, this is TensorRT 11.0.0"),
])
def test_manifest_refuses_another_platform(engine_dir, field, value, match):
    with pytest.raises(EngineError, match=match + r".*Rebuild.*: fssam build --format tensorrt --onnx-dir .*"
                                                  r"--batch 1,2,4 --no-plugin"):
        read_trt_manifest(engine_dir, here={**HERE, field: value})


def test_manifest_refuses_changed_onnx_and_other_config(engine_dir, tiny_cfg):
    onnx_manifest = engine_dir.parent / "graphs" / "manifest.json"
    doc = json.loads(onnx_manifest.read_text())
    doc["stages"]["decoder"]["sha256"] = "bb" * 32
    onnx_manifest.write_text(json.dumps(doc))
    with pytest.raises(EngineError, match=r"ONNX graph of stage 'decoder' in .*graphs changed.*Rebuild: fssam build"):
        read_trt_manifest(engine_dir, here=HERE)
    shutil.rmtree(engine_dir.parent / "graphs")  # graphs gone: the engines stand on their own
    read_trt_manifest(engine_dir, here=HERE)
    with pytest.raises(EngineError, match=r"another config .*'shots': \(1, 5\)"):
        read_trt_manifest(engine_dir, tiny_cfg.replace(shots=5), here=HERE)


def test_engine_file_checks(engine_dir):
    m = read_trt_manifest(engine_dir, here=HERE)
    (engine_dir / "decoder.engine").write_bytes(b"other bytes")
    with pytest.raises(EngineError, match=r"decoder.engine: engine of stage 'decoder' does not match the manifest's "
                                          r"sha256.*rebuild: fssam build"):
        check_engine(engine_dir, m, "decoder")
    with pytest.raises(EngineError, match=r"no engine for stage 'prior' \(built: \['decoder'\]\)"):
        check_engine(engine_dir, m, "prior")
    (engine_dir / ENGINE_MANIFEST).unlink()
    with pytest.raises(EngineError, match="no engine manifest"):
        read_trt_manifest(engine_dir)


# ---------------------------------------------------------------------- plugin: pure functions


def test_plugin_shape_and_type_inference():
    q, kv, c = (2, 1, 256, 256), (2, 1, 520, 256), (2, 1, 256)
    assert tp.output_shape(q, kv, kv, c, 256, 256) == q
    assert tp.output_shape((-1, 1, 256, 256), (-1, 1, 520, 256), kv, (-1, 1, 256), 256, 256)[1:] == q[1:]
    with pytest.raises(InputError, match=r"k\[3\] = 128 but q\[3\] = 256"):
        tp.output_shape(q, (2, 1, 520, 128), kv, c, 256, 256)
    with pytest.raises(InputError, match=r"c\[2\] = 256 but n_qry = 200"):
        tp.output_shape(q, kv, kv, c, 256, 200)
    with pytest.raises(InputError, match="n_sup \\+ n_qry = 600 exceeds the 520 keys"):
        tp.output_shape(q, kv, kv, (2, 1, 300), 300, 300)
    with pytest.raises(InputError, match="input c has rank 4"):
        tp.output_shape(q, kv, kv, q, 256, 256)
    with pytest.raises(InputError, match="head dim 48"):
        tp.output_shape((1, 1, 8, 48), (1, 1, 24, 48), (1, 1, 24, 48), (1, 1, 8), 8, 8)
    assert tp.output_dtype("FP16", "FP16", "FP16", "FP32") == "FP16"
    with pytest.raises(InputError, match="share one type, got FP16, FP32"):
        tp.output_dtype("FP16", "FP32", "FP16", "FP32")
    with pytest.raises(InputError, match=r"attributes \['n_qry'\] are missing"):
        tp.check_node_attrs({"n_sup": 3})
    with pytest.raises(InputError, match="n_qry >= 1"):
        tp.check_node_attrs({"n_sup": 3, "n_qry": 0})


def test_plugin_launch_parameters():
    cfg = tp.TACTICS[3]  # BLOCK_M 32, 4 warps
    assert tp.launch_grid((2, 3, 100, 64), cfg.block_m) == (4, 6, 1)
    assert tp.block_size(cfg) == (128, 1, 1)
    assert tp.extra_args((2, 3, 100, 64), (2, 3, 260, 64), 128, 100) == (3, 100, 260, 128, 100)
    assert tp.EXTRA_ARGS == ("H", "N_Q", "N_K", "N_SUP", "N_QRY")
    consts = tp.kernel_constexprs(256, cfg)
    assert consts == {"HEAD_DIM": 256, "SM_SCALE": 1 / 16, "BLOCK_M": 32, "BLOCK_N": 32}


def test_plugin_tactics_respect_shared_memory_and_problem_size():
    for t in ("FP32", "FP16", "BF16"):
        kept = tp.plugin_tactics(t, 256, 1024)
        assert kept and all(tp.estimated_shared_bytes(tp.TACTICS[i], 256, t) <= tp.DEFAULT_MAX_SHARED_BYTES
                            for i in kept)
    assert tp.plugin_tactics("FP16", 64, 1024, max_shared=1 << 30) == [2, 3, 4, 5, 6, 7]
    assert all(tp.TACTICS[i].block_m <= 16 for i in tp.plugin_tactics("FP16", 32, 10, max_shared=1 << 30))
    combos = tp.type_combinations()
    assert [t for _, t in combos] == ["FP32", "FP16", "BF16"]
    for types, t in combos:
        cols = [c.strip() for c in types.split(",")]
        assert cols[:3] == [t] * 3 and cols[4] == t and cols[3].split("*") == ["FP32", "FP16", "BF16"]


@pytest.mark.parametrize("tactic", [1, 3])
def test_plugin_kernel_in_tensorrt_argument_order(tactic):
    """The TensorRT entry point, launched with the plugin's grid, constexprs and extra args, equals the reference."""
    from fssam_deploy.kernels.triton_calibrated_attention import INTERPRETED

    device = "cpu" if INTERPRETED else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU and the Triton interpreter is off (TRITON_INTERPRET must be set before triton loads)")
    g = torch.Generator().manual_seed(tactic)
    b, h, n_q, d, n_sup, n_qry, rest = 2, 2, 40, 32, 40, 40, 8  # Nq not a multiple of any BLOCK_M
    n_k = n_sup + n_qry + rest
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(device) for n in (n_q, n_k, n_k))
    c = torch.rand(b, h, n_qry, generator=g).to(device)
    out = tp.launch_like_tensorrt(q, k, v, c, n_sup, n_qry, tp.TACTICS[tactic])
    torch.testing.assert_close(out, calibrated_attention_reference(q, k, v, c, n_sup, n_qry), atol=2e-5, rtol=1e-5)


_PTX_SCRIPT = """
import json, re
from fssam_deploy.backends.tensorrt import plugin as tp
out = []
for t, c, d, tactic, arch in [("FP16", "FP32", 256, 3, 90), ("BF16", "BF16", 256, 2, 80), ("FP32", "FP32", 256, 1, 90)]:
    k = tp.compile_plugin_kernel(t, c, d, tp.TACTICS[tactic], arch)
    ptx = k.asm["ptx"]
    params = re.search(r"\\.entry\\s+(\\w+)\\s*\\((.*?)\\)", ptx, re.S)
    kinds = ["ptr" if ".ptr" in p else p.split()[1] for p in params.group(2).split(",")]
    out.append(dict(name=params.group(1), kinds=kinds, shared=k.metadata.shared, warps=k.metadata.num_warps,
                    scratch=k.metadata.global_scratch_size, target=re.search(r"\\.target (\\w+)", ptx).group(1),
                    estimate=tp.estimated_shared_bytes(tp.TACTICS[tactic], d, t), tactic=tactic))
print(json.dumps(out))
"""


def test_plugin_kernel_ptx_has_tensorrts_signature():
    """PTX params: q, k, v, c pointers, then the 5 int32 extra args, then out (then Triton's unused scratch)."""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    for k in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert k["name"] == "_calibrated_attn_trt"
        assert k["kinds"][:10] == ["ptr"] * 4 + [".u32"] * 5 + ["ptr"] and all(x == "ptr" for x in k["kinds"][10:])
        assert k["warps"] == tp.TACTICS[k["tactic"]].num_warps and k["scratch"] == 0
        assert k["shared"] <= k["estimate"] <= tp.DEFAULT_MAX_SHARED_BYTES  # the estimate bounds the real use
    assert [k["target"] for k in json.loads(proc.stdout.strip().splitlines()[-1])] == ["sm_90a", "sm_80", "sm_90a"]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_clear_errors_without_tensorrt(graphs, tmp_path, tiny_cfg):
    from fssam_deploy.backends.registry import open_backend
    from fssam_deploy.backends.tensorrt.build import build_tensorrt
    from fssam_deploy.backends.tensorrt.runner import TrtRunner

    with pytest.raises(BackendUnavailableError, match="needs TensorRT: pip install tensorrt"):
        build_tensorrt(graphs, tmp_path / "engines", batch=(1, 2, 4))
    assert not (tmp_path / "engines").exists() and not list(tmp_path.glob(".engines.*"))
    with pytest.raises(BackendUnavailableError, match="TensorRT >= 10.9"):
        tp.register_plugin()
    with pytest.raises(EngineError, match="run on CUDA devices, got device cpu"):
        TrtRunner(tmp_path, "decoder", device="cpu")
    with pytest.raises(BackendUnavailableError, match=r"backend 'tensorrt' runs on cuda only \(got --device cpu\)"):
        open_backend("tensorrt", tiny_cfg, device="cpu", engine_dir=tmp_path)
