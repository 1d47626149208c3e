"""OpenVINO episodes against PyTorch fp32 eager on the tiny synthetic episodes; zero-copy binding; input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fssam_deploy.backends.registry import open_backend
from fssam_deploy.errors import InputError
from fssam_deploy.hostinfo import openvino_capabilities
from fssam_deploy.parity import parity
from tests.helpers import assert_bf16_rounded_close


@pytest.fixture(scope="module")
def fp32_episode(ov_fp32, tiny_cfg):
    with open_backend("openvino", tiny_cfg, engine_dir=ov_fp32, threads=2) as ep:
        yield ep


def test_fp32_matches_torch(fp32_episode, tiny_episode, torch_logits):
    """As close as ONNX Runtime: 2.8e-7 here; 3.7e-5 (IoU 0.99985) before the memory's bf16 rounding was kept
    exact (`rounding.exact_bf16_rounding`)."""
    p = parity(fp32_episode.segment(*tiny_episode), torch_logits)
    assert p["mask_iou"] == 1.0
    assert p["max_abs_logit_err"] <= 1e-5 * max(1.0, torch_logits.abs().max().item()), p


@pytest.mark.parametrize("seed", [0, 1])
def test_fp32_memory_is_rounded_as_the_reference(fp32_episode, tiny_cfg, seed):
    """The memory encoder's bf16 rounding (the reference stores memory in bfloat16) is exact in the f32 model:
    the stage against eager PyTorch, on the spec's random inputs."""
    import warnings

    from fssam_deploy.model import build_stages, random_weights
    from fssam_deploy.stages import STAGE_SPECS

    assert fp32_episode.settings["exact_bf16_rounding"] == {"memory_encoder": 1}
    spec = STAGE_SPECS["memory_encoder"]
    feed = spec.dummy_inputs(tiny_cfg, batch=1, shots=1, seed=seed)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        want = build_stages(random_weights(tiny_cfg, 0), "torch").memory_encoder(*feed.values())[0]
    runner = fp32_episode.runners["memory_encoder"]
    got = runner.infer({k: v for k, v in feed.items() if k in runner.input_shapes})["memory"]
    assert_bf16_rounded_close(got, want, "openvino:memory_encoder.memory")


def test_veltkamp_rounding_is_torchs_bf16():
    """`exact_bf16_rounding` on a model that is just the round trip: torch's `.to(torch.bfloat16)` bit for bit, on
    random normal values over 60 binades and on exact ties (to even, both ways), negative ones included."""
    import openvino as ov
    import openvino.opset13 as ops

    from fssam_deploy.backends.openvino.rounding import exact_bf16_rounding

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 16, generator=g) * torch.exp2(torch.randint(-30, 30, (1 << 16,), generator=g).float())
    # exact ties: exponent 2^-30..2^30, 7 random mantissa bits (odd and even), then the half-way bit alone
    exponent = torch.randint(127 - 30, 127 + 30, (256,), generator=g, dtype=torch.int32)
    ties = exponent << 23 | torch.randint(0, 128, (256,), generator=g, dtype=torch.int32) << 16 | 0x8000
    x = torch.cat([x, ties.view(torch.float32), -ties.view(torch.float32)])
    p = ops.parameter([x.numel()], np.float32, name="x")
    model = ov.Model([ops.convert(ops.convert(p, "bf16"), "f32")], [p])
    assert exact_bf16_rounding(model) == 1
    assert [op.get_type_name() for op in model.get_ordered_ops()].count("Convert") == 0
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = torch.from_numpy(compiled(x.numpy())[0].copy())
    assert torch.equal(got, x.to(torch.bfloat16).float())


def test_fp32_sets_f32_explicitly(fp32_episode):
    s = fp32_episode.settings
    assert s["compile_config"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert s["compile_config"]["PERFORMANCE_HINT"] == "LATENCY" and s["compile_config"]["INFERENCE_NUM_THREADS"] == 2
    assert set(s["compiled_precision"].values()) == {"f32"}


def test_cached_supports_match_full_episode(fp32_episode, tiny_episode):
    q, sx, sy = tiny_episode
    full = fp32_episode.segment(q[:1], sx[:1], sy[:1])
    torch.testing.assert_close(fp32_episode.with_supports(sx[:1], sy[:1]).segment(q[:1]), full, atol=1e-5, rtol=0)


def test_outputs_are_bound_without_copies(fp32_episode, tiny_cfg):
    runner = fp32_episode.runners["decoder"]
    feed = {k: v for k, v in runner.spec.dummy_inputs(tiny_cfg, 1, 1).items() if k in runner.input_shapes}
    out = runner.infer(feed)["logits"]
    bound = runner.request.get_tensor("logits").data
    assert np.shares_memory(bound, out.numpy())  # OpenVINO wrote into the torch tensor itself
    name = next(iter(feed))
    assert np.shares_memory(runner.request.get_tensor(name).data, feed[name].numpy())


def test_wrong_input_shape_is_refused(fp32_episode):
    runner = fp32_episode.runners["image_encoder"]
    with pytest.raises(InputError, match=r"openvino:image_encoder: input 'images' has shape \(1, 3, 128, 128\), the "
                                         r"graph expects \(\*, 3, 256, 256\)"):
        runner.infer({"images": torch.zeros(1, 3, 128, 128)})


def test_bf16_hint(ov_fp32, tiny_cfg, tiny_episode, torch_logits):
    """bf16 where the CPU has it (AMX / AVX512-BF16), the decoder kept f32 (runner.F32_UNDER_BF16: with it in
    bf16 the tiny config's IoU head picks another mask, IoU 0.15); f32, and said so, elsewhere."""
    with open_backend("openvino-bf16", tiny_cfg, engine_dir=ov_fp32, threads=2) as ep:
        logits = ep.segment(*tiny_episode)
        s = ep.settings
    assert s["compile_config"]["INFERENCE_PRECISION_HINT"] == "bf16"
    assert s["stage_precision_hint"]["decoder"] == "f32" and s["stage_precision_hint"]["dino_features"] == "bf16"
    native = "BF16" in (openvino_capabilities() or ())
    compiled = s["compiled_precision"]
    assert compiled.pop("decoder") == "f32"
    assert set(compiled.values()) == {"bf16" if native else "f32"}  # what the CPU really runs
    assert "decoder kept f32" in s["note"] and (native or "this CPU has no native bf16" in s["note"])
    # the round trip is rewritten where the model runs in f32 only: in bf16 its subtraction would cancel to 0
    assert s["exact_bf16_rounding"] == ({} if native else {"memory_encoder": 1})
    p = parity(logits, torch_logits)
    assert p["mask_iou"] >= (0.98 if native else 0.999), p


def test_int8(ov_int8, tiny_cfg, tiny_episode, torch_logits):
    with open_backend("openvino-int8", tiny_cfg, engine_dir=ov_int8, threads=2) as ep:
        logits = ep.segment(*tiny_episode)
        q = ep.settings["quantized"]
    assert set(q) == {"dino_features"}  # the int8 image encoder costs IoU (quantize.QUANTIZED_STAGES)
    assert q["dino_features"]["fake_quantize_ops"] > 0 and q["dino_features"]["nodes_kept_fp32"] >= 12
    assert parity(logits, torch_logits)["mask_iou"] >= 0.98


def test_int8_bf16_hint(ov_int8, tiny_cfg, tiny_episode, torch_logits):
    """The int8 IR under the bf16 hint: DINOv2 still quantized, the other stages bf16 where the CPU has it (the
    decoder f32), f32 and said so elsewhere."""
    with open_backend("openvino-int8-bf16", tiny_cfg, engine_dir=ov_int8, threads=2) as ep:
        logits = ep.segment(*tiny_episode)
        s = ep.settings
    assert s["precision"] == "int8" and set(s["quantized"]) == {"dino_features"}
    assert s["stage_precision_hint"]["decoder"] == "f32" and s["stage_precision_hint"]["image_encoder"] == "bf16"
    native = "BF16" in (openvino_capabilities() or ())
    compiled = s["compiled_precision"]
    assert compiled.pop("decoder") == "f32" and set(compiled.values()) == {"bf16" if native else "f32"}
    assert "decoder kept f32" in s["note"] and (native or "this CPU has no native bf16" in s["note"])
    assert parity(logits, torch_logits)["mask_iou"] >= 0.98


def test_build_missing_converts_into_the_workdir(tiny_graphs, tiny_cfg, tiny_episode, torch_logits, monkeypatch):
    """Without --engine-dir (benchmarks): export (here: the session's graphs stand in for it), convert, run."""
    monkeypatch.setattr("fssam_deploy.onnx.export.export_onnx", lambda *a, **k: tiny_graphs)
    ep = open_backend("openvino", tiny_cfg, build_missing=True, threads=2)
    try:
        workdir = ep.owned_dirs[0].name
        assert ep.settings["engine_dir"].startswith(workdir)
        assert parity(ep.segment(*tiny_episode), torch_logits)["mask_iou"] >= 0.999
    finally:
        ep.close()
    import os

    assert not os.path.exists(workdir)
