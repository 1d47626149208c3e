"""How far a backend's outputs are from a reference's: the logits' mask IoU (logits > 0, i.e. sigmoid >= 0.5) and
max error, and the rule a stage output is held to (`StageTolerance`), read by `fssam verify` and the tests."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def mask_iou(logits: torch.Tensor, ref: torch.Tensor) -> float:
    """IoU of the masks `logits > 0` and `ref > 0` over every pixel of the batch (1.0 when both are empty)."""
    a, b = logits.float().cpu() > 0, ref.float().cpu() > 0
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def parity(logits: torch.Tensor, ref: torch.Tensor) -> dict:
    """{"mask_iou", "max_abs_logit_err", "ref_abs_max"} of `logits` against `ref` (same shape)."""
    err = (logits.float().cpu() - ref.float().cpu()).abs().max().item()
    return {"mask_iou": mask_iou(logits, ref), "max_abs_logit_err": err, "ref_abs_max": ref.abs().max().item()}


BF16_STEP = 2.0**-7  # one bfloat16 step, relative to the value: 8 significant bits
BF16_FLIP_SHARE = 1e-3  # the share of a bf16-rounded output's elements that may land one step away


def share_off(got, want, atol: float) -> float:
    """The share of elements (torch tensors or numpy arrays of one shape) with |got - want| > atol; NaN counts."""
    got, want = torch.as_tensor(got).float().cpu(), torch.as_tensor(want).float().cpu()
    if got.shape != want.shape:
        raise ValueError(f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}")
    diff = (got - want).abs()
    return (~(diff <= atol)).float().mean().item() if diff.numel() else 0.0


@dataclass(frozen=True)
class StageTolerance:
    """What one stage output must meet against PyTorch fp32, relative to its scale (max |reference|).

    fp32 output: every element within `rtol` x scale. bf16-rounded output (`TensorSpec.bf16_rounded`: the memory,
    stored in bfloat16 as the reference stores it): an input within ~1e-7 of a rounding boundary may land one bf16
    step away, so fewer than BF16_FLIP_SHARE of the elements may be off by more than `rtol` x scale, and none by
    more than BF16_STEP x scale. A runtime that drops or breaks the rounding is off in most elements (measured on
    the tiny config: 71% where Inductor fused the cast away, 24% under OpenVINO's CPU plugin) and fails."""

    rtol: float
    bf16_rounded: bool = False

    @property
    def max_rtol(self) -> float:
        """The bound on the largest error, x scale."""
        return BF16_STEP if self.bf16_rounded else self.rtol

    def ok(self, max_abs: float, scale: float, off: float | None = None) -> bool:
        """`off`: the share of elements beyond `rtol` x scale (`share_off`), needed for a bf16-rounded output."""
        if not math.isfinite(max_abs) or max_abs > self.max_rtol * scale:
            return False
        if not self.bf16_rounded:
            return True
        if off is None:
            raise ValueError("a bf16-rounded output is judged by the share of elements off; pass `off`")
        return off < BF16_FLIP_SHARE

    def check(self, got, want) -> dict:
        """{"max_abs", "scale", "off" (None unless bf16-rounded), "ok"} of `got` against `want`; another shape
        than `want`'s fails (max_abs NaN)."""
        got, want = torch.as_tensor(got).float().cpu(), torch.as_tensor(want).float().cpu()
        scale = max(want.abs().max().item(), 1e-6) if want.numel() else 1e-6
        if got.shape != want.shape:
            return {"max_abs": math.nan, "scale": scale, "off": 1.0 if self.bf16_rounded else None, "ok": False}
        diff = (got - want).abs()
        max_abs = diff.max().item() if torch.isfinite(got).all() else math.nan
        off = share_off(got, want, self.rtol * scale) if self.bf16_rounded else None
        return {"max_abs": max_abs, "scale": scale, "off": off, "ok": self.ok(max_abs, scale, off)}

    def describe(self) -> str:
        if self.bf16_rounded:
            return f"<= {self.rtol:.0e} x scale but < {BF16_FLIP_SHARE:.1%} of elements, all <= 2^-7 x scale"
        return f"<= {self.rtol:.0e} x scale"
