"""FSSAM's own operator, the support-calibrated attention: reference, fused Triton kernel, op."""

from .reference import calibrated_attention_reference, calibration_weights, minmax, weighted_gap


def calibrated_attention(q, k, v, c, n_sup: int, n_qry: int, backend: str = "auto"):
    """Dispatch (temporary: plain reference until the fused kernel lands)."""
    return calibrated_attention_reference(q, k, v, c, n_sup, n_qry)


__all__ = ["calibrated_attention", "calibrated_attention_reference", "calibration_weights", "minmax", "weighted_gap"]
