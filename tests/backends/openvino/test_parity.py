"""OpenVINO episodes against PyTorch fp32 eager on the tiny synthetic episodes; zero-copy binding; input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fssam_deploy.backends.registry import open_backend
from fssam_deploy.errors import InputError
from fssam_deploy.hostinfo import openvino_capabilities
from fssam_deploy.parity import parity


@pytest.fixture(scope="module")
def fp32_episode(ov_fp32, tiny_cfg):
    with open_backend("openvino", tiny_cfg, engine_dir=ov_fp32, threads=2) as ep:
        yield ep


def test_fp32_matches_torch(fp32_episode, tiny_episode, torch_logits):
    p = parity(fp32_episode.segment(*tiny_episode), torch_logits)
    assert p["mask_iou"] >= 0.999
    assert p["max_abs_logit_err"] <= 1e-3 * max(1.0, torch_logits.abs().max().item())


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
