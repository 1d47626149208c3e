"""The GEMM floor: FLOPs counted per stage on the PyTorch modules, the matmul rate, the floor in bench rows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fssam_deploy.bench import flops
from fssam_deploy.bench.flops import floor_fields, flop_counter_mode, matmul_gflops, openvino_matmul_gflops
from fssam_deploy.bench.report import floor_table, markdown_table
from fssam_deploy.hostinfo import openvino_capabilities
from fssam_deploy.model.config import DINO_INPUT_SIZE, DINO_MODELS
from fssam_deploy.synthetic import episode_tensors


def test_cpu_attention_and_matmul_are_counted():
    q, k = torch.randn(2, 3, 50, 16), torch.randn(2, 3, 70, 16)
    with torch.inference_mode(), flop_counter_mode() as counter:
        F.scaled_dot_product_attention(q, k, k)  # the CPU's fused op, which torch counts as 0 by itself
        torch.randn(5, 7) @ torch.randn(7, 11)
    assert counter.get_total_flops() == 2 * (2 * 2 * 3 * 50 * 70 * 16) + 2 * 5 * 7 * 11


def _episode_flops(pipeline, cfg, batch):
    q, sx, sy = episode_tensors(cfg, batch, 1, seed=0)
    with pipeline.counting_flops() as flops:
        pipeline.segment_query(q, pipeline.encode_supports(sx, sy))
    return dict(flops)


def test_episode_flops_per_stage(tiny_pipeline, tiny_cfg):
    one = _episode_flops(tiny_pipeline, tiny_cfg, 1)
    assert set(one) == {"image_encoder", "dino_features", "memory_encoder", "prior", "refinement", "decoder"}
    assert tiny_pipeline.stage_flops is None  # counting ends with the block
    # DINOv2 by hand: per block 24 N D^2 (qkv, proj, two MLP matmuls) + 4 N^2 D (attention), N tokens with the
    # class token, plus the patch embedding; one support and one query image.
    _, dim, depth = DINO_MODELS[tiny_cfg.dino]
    patches = (DINO_INPUT_SIZE // 14) ** 2
    n = patches + 1
    per_image = depth * (24 * n * dim**2 + 4 * n**2 * dim) + 2 * patches * 3 * 14 * 14 * dim
    assert one["dino_features"] == pytest.approx(2 * per_image, rel=0.01)
    for name in ("image_encoder", "memory_encoder", "decoder"):
        assert one[name] > 0, name
    # every stage is linear in the batch (to a few small matmuls whose batch axis is folded differently)
    two = _episode_flops(tiny_pipeline, tiny_cfg, 2)
    assert two == {k: pytest.approx(2 * v, rel=1e-4) for k, v in one.items()}


def test_matmul_rate_and_floor_fields():
    rate = matmul_gflops(torch.float32, n=256, repeats=3)
    assert math.isfinite(rate) and rate > 0.1
    f = floor_fields({"a": 3e9, "b": 1e9}, episode_ms=80.0, rates={"fp32": 50.0, "bf16": 200.0})
    assert f["gflop"] == pytest.approx(4.0) and f["stage_gflop"] == {"a": 3.0, "b": 1.0}
    assert f["bf16_floor_ms"] == pytest.approx(20.0) and f["vs_bf16_floor"] == pytest.approx(4.0)
    assert f["fp32_floor_ms"] == pytest.approx(80.0) and f["vs_fp32_floor"] == pytest.approx(1.0)
    assert "bf16_floor_ms" not in floor_fields({"a": 1e9}, 10.0, None)
    assert set(floor_fields({"a": 1e9}, 10.0, {"fp32": 10.0})) == {"stage_gflop", "gflop", "fp32_floor_ms",
                                                                    "vs_fp32_floor"}


def test_floor_table_in_the_report():
    row = {"backend": "torch", "shots": 1, "batch": 1, "episode": {"median_ms": 80.0, "p90_ms": 81.0},
           "cached_query": {"median_ms": 40.0}, "episodes_per_s": 12.5, "cached_queries_per_s": 25.0,
           "cached_speedup": 2.0, "runtime_overhead_pct": 0.0, "rss_peak_mb": 100, "stages_ms": {"a": 60.0},
           **floor_fields({"a": 3e9, "b": 1e9}, 80.0, {"fp32": 50.0, "bf16": 200.0})}
    result = {"config": {"sam2_config": "t", "dino": "s", "image_size": 256, "num_refine": 3, "refine": "v1"},
              "environment": {"processor": "x86_64", "host": "Some CPU (AVX2), 2 threads", "device": "cpu",
                              "threads": 2, "torch": "2", "matmul_gflops": {"fp32": 50.0, "bf16": 200.0}},
              "rows": [row]}
    text = markdown_table(result)
    assert "Some CPU (AVX2), 2 threads (cpu)" in text
    assert "fp32 50 GFLOP/s, bf16 200 GFLOP/s" in text and "the bf16 floor is this machine's" in text
    assert "| 1 | 1 | 3.0 | 1.0 | 4.0 | 80.0 | 20.0 |" in text and "| torch | 1 | 1 | 80.0 | 1.00x | 4.00x |" in text
    # a CPU without bf16 units (AVX2): bf16 runs far below fp32, and the fp32 floor is the machine's
    result["environment"]["matmul_gflops"] = {"fp32": 50.0, "bf16": 0.5}
    result["rows"][0].update(floor_fields({"a": 3e9, "b": 1e9}, 80.0, {"fp32": 50.0, "bf16": 0.5}))
    text = markdown_table(result)
    assert "the fp32 floor is this machine's" in text and "| 1 | 1 | 3.0 | 1.0 | 4.0 | 80.0 | 8000.0 |" in text
    assert "bf16 0.5 GFLOP/s" in text and "| torch | 1 | 1 | 80.0 | 1.00x | 0.01x |" in text
    # a JSON from before the fp32 floor was kept (bf16 fields only): the fp32 cells are left empty
    for key in ("fp32_floor_ms", "vs_fp32_floor"):
        del result["rows"][0][key]
    assert "| torch | 1 | 1 | 80.0 |  | 0.01x |" in markdown_table(result)
    del result["environment"]["matmul_gflops"]
    assert floor_table(result) == []


def test_openvino_matmul_rate():
    """OpenVINO's matmul is timed as torch's is; its bf16 hint only where the plugin runs bf16 (else it is f32)."""
    pytest.importorskip("openvino")
    rate = openvino_matmul_gflops(torch.float32, n=256, repeats=3)
    assert math.isfinite(rate) and rate > 0.1
    bf16 = openvino_matmul_gflops(torch.bfloat16, n=256, repeats=3)
    assert (bf16 is None) == ("BF16" not in openvino_capabilities())


def test_the_floor_is_the_fastest_library(monkeypatch):
    """Per dtype the floor takes the fastest library's rate (a probe on a 2-core AVX-512 EPYC: OpenVINO's fp32 at 368
    GFLOP/s against torch's 183, torch's bf16 at 800 against OpenVINO's 619), and the report names both."""
    monkeypatch.setattr(flops, "matmul_gflops", lambda dtype, device="cpu": {torch.float32: 183.0,
                                                                             torch.bfloat16: 800.0}[dtype])
    ov = {torch.float32: 368.0, torch.bfloat16: 619.0}
    monkeypatch.setattr(flops, "openvino_matmul_gflops", lambda dtype, threads=None: ov[dtype])
    env = flops.floor_environment("cpu", threads=2)
    assert env == {"matmul_gflops": {"fp32": 368.0, "bf16": 800.0},
                   "matmul_gflops_by_library": {"torch": {"fp32": 183.0, "bf16": 800.0},
                                                "openvino": {"fp32": 368.0, "bf16": 619.0}}}
    row = {"backend": "openvino", "shots": 1, "batch": 1, "episode": {"median_ms": 3182.0},
           **floor_fields({"a": 939.5e9}, 3182.0, env["matmul_gflops"])}
    text = "\n".join(floor_table({"rows": [row], "environment": env}))
    assert ("matmul 2048^3 on this device, the fastest of torch and openvino, fp32 368 GFLOP/s (openvino; torch "
            "183), bf16 800 GFLOP/s (torch; openvino 619)") in text
    assert "| openvino | 1 | 1 | 3182.0 | 1.25x | 2.71x |" in text  # 939.5 GFLOP at 368: 2553 ms
    ov[torch.bfloat16] = None  # no native bf16: OpenVINO gives fp32 only
    env = flops.floor_environment("cpu")
    assert env["matmul_gflops_by_library"]["openvino"] == {"fp32": 368.0} and env["matmul_gflops"]["bf16"] == 800.0
    assert "bf16 800 GFLOP/s; an episode" in "\n".join(floor_table({"rows": [row], "environment": env}))
    monkeypatch.setattr(flops, "openvino_matmul_gflops", lambda dtype, threads=None: None)  # not installed
    assert flops.floor_environment("cpu")["matmul_gflops_by_library"] == {"torch": {"fp32": 183.0, "bf16": 800.0}}
    assert list(flops.floor_environment("cuda")["matmul_gflops_by_library"]) == ["torch"]  # OpenVINO: CPU only
