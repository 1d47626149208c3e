"""Typed exceptions. Every message says what is wrong, why, and how to fix it."""

from __future__ import annotations


class FSSAMError(Exception):
    """Base class of every error this toolkit raises on purpose."""


class ConfigError(FSSAMError, ValueError):
    """An unknown preset or model name, or an invalid combination of settings."""


class CheckpointError(FSSAMError):
    """A checkpoint that is missing, unreadable, or of another architecture."""


class InputError(FSSAMError, ValueError):
    """A tensor, image or mask with the wrong shape, dtype, range or content."""


class EngineError(FSSAMError):
    """An exported graph or engine that is missing, stale, or from another config."""


class BackendUnavailableError(FSSAMError, ImportError):
    """An optional backend whose package is not installed."""


class AccuracyError(FSSAMError, AssertionError):
    """A backend whose outputs differ from PyTorch by more than the tolerance."""


def expect_shape(name: str, tensor, shape: tuple, where: str = "") -> None:
    """Raise InputError unless `tensor.shape` matches `shape` (None matches any size)."""
    got = tuple(tensor.shape)
    ok = len(got) == len(shape) and all(s is None or s == g for s, g in zip(shape, got))
    if not ok:
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        at = f" in {where}" if where else ""
        raise InputError(f"{name}{at}: expected shape {want}, got {got}")
