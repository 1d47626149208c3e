"""A stage run under autocast, with float32 inputs and outputs: the same contract in lower precision.

Used to build reduced-precision AOTInductor packages (bf16/fp16 matmuls and convolutions, with
autocast's fp32 list -- softmax, layer norm, reductions -- kept in fp32), the way the reference
runs on GPUs (`torch.autocast("cuda", dtype=torch.bfloat16)`).
"""

from __future__ import annotations

import torch
from torch import nn

from fssam_deploy.errors import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class AutocastStage(nn.Module):
    def __init__(self, stage: nn.Module, precision: str, device_type: str):
        super().__init__()
        if precision not in AUTOCAST_DTYPES:
            raise ConfigError(f"precision {precision!r}: autocast stages are {sorted(AUTOCAST_DTYPES)}")
        self.stage, self.dtype, self.device_type = stage, AUTOCAST_DTYPES[precision], device_type

    def forward(self, *inputs: torch.Tensor):
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.stage(*inputs)
        if isinstance(out, tuple):
            return tuple(t.float() for t in out)
        return out.float()
