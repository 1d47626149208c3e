"""The decoder stage with the fused Triton attention equals the plain one (interpreter on CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch

from fssam_deploy.kernels import triton_available
from fssam_deploy.model import FSSAMConfig, build_stages, random_weights


@pytest.mark.skipif(not triton_available(), reason="Triton cannot run here (no CUDA GPU and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("shots", [1, 5])
def test_decoder_triton_equals_torch(shots):
    cfg = FSSAMConfig.from_name("tiny", image_size=128, shots=shots)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = random_weights(cfg, 0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    plain, fused = build_stages(w, "torch"), build_stages(w, "triton")
    w.to(dev)
    g = torch.Generator().manual_seed(shots)
    h, s = cfg.feat_size, cfg.image_size
    r = lambda *shape: torch.randn(*shape, generator=g).to(dev)  # noqa: E731
    masks = torch.zeros(1, shots, s, s, device=dev)
    masks[..., 20:80, 30:90] = 1
    args = (r(1, 256, h, h), r(1, 32, 4 * h, 4 * h), r(1, 64, 2 * h, 2 * h), r(1, shots, 64, h, h),
            r(1, shots, 256), r(1, 64, h, h), r(1, 256), masks)
    with torch.no_grad():
        torch.testing.assert_close(fused.decoder.to(dev)(*args), plain.decoder.to(dev)(*args), atol=1e-5, rtol=1e-5)
