"""The TensorRT path on a GPU (tiny config): the plugin kernel launched as TensorRT launches it, engines
built with Polygraphy, the episode and every stage against PyTorch, plugin vs standard decoder, CUDA graph
replay, profile and staleness errors.

Skips with a reason without a CUDA GPU; the engine tests also without TensorRT (pip install tensorrt,
>= 10.9 for the plugin). The first test needs only a GPU and cuda-python: it loads the plugin's PTX with
the CUDA driver and launches it with the plugin's grid, block, shared memory and argument order.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import shutil

import pytest
import torch

from fssam_deploy.backends.base import Runner
from fssam_deploy.backends.tensorrt import plugin as tp
from fssam_deploy.errors import EngineError, InputError
from fssam_deploy.kernels.reference import calibrated_attention_reference
from fssam_deploy.stages import STAGE_SPECS, stage_module
from fssam_deploy.verify import spec_tolerance
from tests.helpers import make_episode

CUDA = torch.cuda.is_available()
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_trt = pytest.mark.skipif(not (CUDA and HAVE_TRT), reason="needs a CUDA GPU and TensorRT (pip install tensorrt)")
BATCH = (1, 2, 4)


# ------------------------------------------------------------------ the plugin kernel, as TensorRT runs it


def _check(result):
    from cuda.bindings import driver as cu

    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver error {err}")
    return rest[0] if len(rest) == 1 else rest


def _driver_launch(kernel, n_params: int, pointers, scalars, out, grid, block, shared) -> None:
    """cuModuleLoadData(PTX) + cuLaunchKernel with the arguments in TensorRT's order: input pointers, int32
    extra args, output pointer, then Triton's hidden scratch pointers passed null (as TensorRT passes them)."""
    from cuda.bindings import driver as cu

    _check(cu.cuCtxSetCurrent(_check(cu.cuDevicePrimaryCtxRetain(_check(cu.cuDeviceGet(torch.cuda.current_device()))))))
    module = _check(cu.cuModuleLoadData(kernel.asm["ptx"].encode() + b"\0"))
    func = _check(cu.cuModuleGetFunction(module, kernel.metadata.name.encode()))
    if shared > 48 * 1024:
        _check(cu.cuFuncSetAttribute(func, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                     shared))
    values = [ctypes.c_void_p(p.data_ptr()) for p in pointers] + [ctypes.c_int32(int(s)) for s in scalars]
    values += [ctypes.c_void_p(out.data_ptr())] + [ctypes.c_void_p(0)] * (n_params - len(values) - 1)
    params = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
    stream = torch.cuda.current_stream().cuda_stream
    _check(cu.cuLaunchKernel(func, *grid, *block, shared, stream, ctypes.addressof(params), 0))
    torch.cuda.synchronize()


@pytest.fixture(scope="module")
def graphs(tiny_graphs):
    """The session's tiny graphs (with the decoder's plugin variant)."""
    return tiny_graphs


@needs_cuda
@pytest.mark.parametrize("trt_type", ["FP16", "BF16", "FP32"])


def test_plugin_kernel_as_tensorrt_launches_it(trt_type):
    pytest.importorskip("cuda.bindings", reason="needs cuda-python (pip install cuda-python)")
    import re

    dtype = {"FP32": torch.float32, "FP16": torch.float16, "BF16": torch.bfloat16}[trt_type]
    major, minor = torch.cuda.get_device_capability()
    g = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 1, 256, 256  # the tiny decoder's cross-attention: 1-shot keys = 2 frames + 8 pointers
    n_k = 2 * n + 8
    q, k, v = (torch.randn(b, h, m, d, generator=g).to("cuda", dtype) for m in (n, n_k, n_k))
    c = torch.rand(b, h, n, generator=g).cuda()
    want = calibrated_attention_reference(q, k, v, c, n, n).float()
    tol = 1e-4 if trt_type == "FP32" else 2e-2
    for tactic in tp.plugin_tactics(trt_type, d, n):
        config = tp.TACTICS[tactic]
        kernel = tp.compile_plugin_kernel(trt_type, "FP32", d, config, major * 10 + minor)
        n_params = len(re.search(r"\.entry\s+\w+\s*\((.*?)\)", kernel.asm["ptx"], re.S).group(1).split(","))
        out = torch.full_like(q, float("nan"))
        _driver_launch(kernel, n_params, (q, k, v, c), tp.extra_args(q.shape, k.shape, n, n), out,
                       tp.launch_grid(q.shape, config.block_m), tp.block_size(config), kernel.metadata.shared)
        err = (out.float() - want).abs().max().item()
        assert err <= tol * want.abs().max().item(), (trt_type, tactic, err)


class _GpuStage(Runner):
    """A stand-in stage on the GPU: outputs of the spec's shapes, each a function of every input (no model)."""

    def __init__(self, spec, cfg):
        super().__init__()
        self.spec, self.cfg, self.name = spec, cfg, f"gpu:{spec.name}"
        self.input_shapes = {t.name: tuple(None if isinstance(d, str) and d in "BMK" else n
                                           for d, n in zip(t.shape, t.concrete(cfg, 1, 1))) for t in spec.inputs}

    def infer_impl(self, feed):
        n = feed[self.spec.input_names[0]].shape[0]
        s = sum(v.reshape(n, -1).float().mean(1) for v in feed.values())  # (n,)
        outs = {}
        for i, t in enumerate(self.spec.outputs):
            shape = t.concrete(self.cfg, n, self.cfg.shots)
            grid = torch.linspace(0, 1, shape[-1], device=s.device)
            outs[t.name] = (s.reshape(n, *[1] * (len(shape) - 1)) * (i + 1) + grid).expand(shape).contiguous()
        return outs


@needs_cuda
def test_captured_query_replays_the_query_side(tiny_cfg):
    """CapturedQuery = segment_query, for new queries and new supports copied in; shape changes refused."""
    from fssam_deploy.backends.tensorrt.episode import CapturedQuery
    from fssam_deploy.episode import Episode

    episode = Episode({n: _GpuStage(s, tiny_cfg) for n, s in STAGE_SPECS.items()}, tiny_cfg, "cuda")
    q1, sx1, sy1 = (t.cuda() for t in make_episode(tiny_cfg, batch=2, seed=1))
    q2, sx2, sy2 = (t.cuda() for t in make_episode(tiny_cfg, batch=2, seed=2))
    sup1, sup2 = episode.encode_supports(sx1, sy1), episode.encode_supports(sx2, sy2)
    graph = CapturedQuery(episode, q1.shape, sup1)
    a, b = graph.segment(q1), graph.segment(q2)
    torch.testing.assert_close(a, episode.segment_query(q1, sup1), atol=0, rtol=0)
    torch.testing.assert_close(b, episode.segment_query(q2, sup1), atol=0, rtol=0)
    assert not torch.equal(a, b)
    torch.testing.assert_close(graph.segment(q1, sup2), episode.segment_query(q1, sup2), atol=0, rtol=0)
    with pytest.raises(InputError, match=r"query has shape \(1, 3, 256, 256\), the CUDA graph was captured for"):
        graph.segment(q1[:1])


# ----------------------------------------------------------------------------------- engines


@pytest.fixture(scope="module")
def engines(graphs):
    """{"plugin": engines with the decoder's AOT plugin, "standard": without}, fp32, batch 1..4."""
    from fssam_deploy.backends.tensorrt.build import build_tensorrt

    cache = graphs.parent / "timing.cache"
    return {"plugin": build_tensorrt(graphs, graphs.parent / "engines", batch=BATCH, timing_cache=cache,
                                     progress=False),
            "standard": build_tensorrt(graphs, graphs.parent / "engines-std", batch=BATCH, timing_cache=cache,
                                       plugin=False, progress=False)}


@pytest.fixture(scope="module")
def eager(tiny_cfg):
    from fssam_deploy.model import build_stages, random_weights

    return build_stages(random_weights(tiny_cfg, 0).cuda(), attention_backend="torch")


def _rel_err(got, ref):
    return (got.float() - ref.float()).abs().max().item() / max(ref.abs().max().item(), 1e-6)


@needs_trt
def test_engine_manifest(engines, graphs, tiny_cfg):
    from fssam_deploy.backends.tensorrt.manifest import current_platform, read_trt_manifest

    for kind, path in engines.items():
        m = read_trt_manifest(path, tiny_cfg, here=current_platform())
        assert set(m["stages"]) == set(STAGE_SPECS) and m["batch"] == list(BATCH)
        assert {s for s, e in m["stages"].items() if e["plugin"]} == ({"decoder"} if kind == "plugin" else set())
        assert m["stages"]["decoder"]["custom_nodes"] == (4 if kind == "plugin" else 0)
    assert (graphs.parent / "timing.cache").is_file() and (graphs.parent / "timing.cache.key.json").is_file()


@needs_trt
@pytest.mark.parametrize("batch", [1, 3])
def test_every_stage_matches_pytorch(engines, eager, tiny_cfg, batch):
    from fssam_deploy.backends.tensorrt.runner import TrtRunner

    for name, spec in STAGE_SPECS.items():
        feed = {k: v.cuda() for k, v in spec.dummy_inputs(tiny_cfg, batch, tiny_cfg.shots, seed=batch).items()}
        with TrtRunner(engines["standard"], name, tiny_cfg) as runner:
            got = runner.infer({k: v for k, v in feed.items() if k in runner.input_shapes})
        with torch.no_grad():
            ref = stage_module(eager, name)(*feed.values())
        for out, r in zip(spec.output_names, ref if isinstance(ref, tuple) else (ref,)):
            assert got[out].device.type == "cuda" and got[out].shape == r.shape, (name, out)
            check = spec_tolerance(spec, out).check(got[out], r)  # the bf16-rounded memory: `fssam verify`'s rule
            assert check["ok"], (name, out, check)


@needs_trt
def test_plugin_decoder_equals_standard_decoder(engines, tiny_cfg):
    from fssam_deploy.backends.tensorrt.runner import TrtRunner

    feed = {k: v.cuda() for k, v in STAGE_SPECS["decoder"].dummy_inputs(tiny_cfg, 2, tiny_cfg.shots, 7).items()}
    with TrtRunner(engines["plugin"], "decoder") as a, TrtRunner(engines["standard"], "decoder") as b:
        assert _rel_err(a.infer(feed)["logits"], b.infer(feed)["logits"]) <= 1e-4


@needs_trt
@pytest.mark.parametrize("kind", ["plugin", "standard"])
def test_episode_matches_pipeline(engines, tiny_cfg, kind):
    from fssam_deploy.backends.tensorrt.episode import tensorrt_episode
    from fssam_deploy.model import Pipeline, random_weights

    pipe = Pipeline(random_weights(tiny_cfg, 0), attention_backend="torch").cuda()
    q, sx, sy = (t.cuda() for t in make_episode(tiny_cfg, batch=3, seed=5))
    with tensorrt_episode(engines[kind], expect=tiny_cfg) as episode, episode.timing() as times:
        got = episode.segment(q, sx, sy)
        assert got.dtype == torch.float32 and sorted(times) == sorted(STAGE_SPECS)
    ref = pipe.segment(q, sx, sy)
    assert (got - ref).abs().max().item() <= 1e-3
    assert ((got > 0) == (ref > 0)).float().mean().item() >= 0.999


@needs_trt
def test_cuda_graph_replay_equals_episode(engines, tiny_cfg):
    from fssam_deploy.backends.tensorrt.episode import CapturedQuery, tensorrt_episode

    with tensorrt_episode(engines["plugin"], expect=tiny_cfg) as episode:
        q1, sx1, sy1 = (t.cuda() for t in make_episode(tiny_cfg, batch=2, seed=1))
        q2, sx2, sy2 = (t.cuda() for t in make_episode(tiny_cfg, batch=2, seed=2))
        sup1, sup2 = episode.encode_supports(sx1, sy1), episode.encode_supports(sx2, sy2)
        graph = CapturedQuery(episode, q1.shape, sup1)
        torch.testing.assert_close(graph.segment(q2), episode.segment_query(q2, sup1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(graph.segment(q1, sup2), episode.segment_query(q1, sup2), atol=1e-5, rtol=1e-5)
        with pytest.raises(InputError, match=r"query has shape \(1, 3, 256, 256\), the CUDA graph was captured for"):
            graph.segment(q1[:1])


@needs_trt
def test_runner_errors(engines, graphs, tiny_cfg, tmp_path):
    from fssam_deploy.backends.tensorrt.runner import TrtRunner

    feed = {k: v.cuda() for k, v in STAGE_SPECS["refinement"].dummy_inputs(tiny_cfg, 5, tiny_cfg.shots).items()}
    with TrtRunner(engines["standard"], "refinement") as runner:
        with pytest.raises(InputError, match=r"outside the engine's profile .*--batch"):
            runner.infer(feed)
    copy = tmp_path / "engines"
    shutil.copytree(engines["standard"], copy)
    with open(copy / "decoder.engine", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EngineError, match="engine of stage 'decoder' does not match the manifest's sha256"):
        TrtRunner(copy, "decoder")
    manifest = json.loads((copy / "engines.json").read_text())
    manifest["platform"]["tensorrt"] = "0.0.0"
    (copy / "engines.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="built with TensorRT 0.0.0.*Rebuild: fssam build --format tensorrt"):
        TrtRunner(copy, "prior")


@needs_trt
@pytest.mark.parametrize("precision,plugin", [("fp16", False), ("fp16", True), ("bf16", True)])
def test_half_engines(tmp_path, tiny_cfg, precision, plugin):
    from fssam_deploy.backends.tensorrt.build import build_tensorrt
    from fssam_deploy.backends.tensorrt.episode import tensorrt_episode
    from fssam_deploy.model import Pipeline, random_weights
    from fssam_deploy.onnx import export as onnx_export
    from fssam_deploy.onnx.plugin_variant import export_plugin_variants

    graphs = onnx_export.export_onnx(tiny_cfg, tmp_path / "g", seed=0, batch="dynamic", precision=precision,
                                     progress=False)
    if plugin:
        export_plugin_variants(tiny_cfg, graphs, seed=0)
    engines = build_tensorrt(graphs, tmp_path / "e", precision=precision, batch=BATCH, plugin=plugin, progress=False)
    decoder = json.loads((engines / "engines.json").read_text())["stages"]["decoder"]
    assert decoder["strongly_typed"] and decoder["plugin"] == plugin
    q, sx, sy = (t.cuda() for t in make_episode(tiny_cfg, batch=2, seed=3))
    with tensorrt_episode(engines, expect=tiny_cfg) as episode:
        got = episode.segment(q, sx, sy)
    ref = Pipeline(random_weights(tiny_cfg, 0), attention_backend="torch").cuda().segment(q, sx, sy)
    assert _rel_err(got, ref) <= 5e-2 and ((got > 0) == (ref > 0)).float().mean().item() >= 0.98
