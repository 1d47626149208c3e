"""Checks a command runs before any expensive work: devices present, flags in range, folders writable.

Each check raises a ConfigError whose message names the flag or path, says what is wrong and what to give
instead, so the CLI prints one `error: ...` line before a model is built.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from fssam_deploy.errors import ConfigError

DEVICE_TYPES = ("cpu", "cuda")


def check_device(device: str, flag: str = "--device"):
    """`device` as a torch.device, after checking it exists here: cpu, cuda (a GPU must be visible) or cuda:N
    (N below the GPU count). Anything else (tpu, mps, a typo) is a ConfigError naming the flag."""
    import torch

    text = str(device).strip()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{flag} {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type not in DEVICE_TYPES:
        raise ConfigError(f"{flag} {device!r}: device type {dev.type!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cpu":
        if dev.index not in (None, 0):
            raise ConfigError(f"{flag} {device!r}: there is one CPU device; use cpu")
        return dev
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU-only build)"
        raise ConfigError(f"{flag} {device!r}: no CUDA GPU is visible (torch {torch.__version__}, CUDA {built}); "
                          "use --device cpu, or install a CUDA build of torch on a machine with a GPU")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ConfigError(f"{flag} {device!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1}); "
                          f"pick one of them")
    return dev


def check_positive(flag: str, value, minimum: int = 1) -> int:
    """`value` as an int >= `minimum`, else a ConfigError naming `flag` (e.g. `--batch 0`, `--batch -1`)."""
    try:
        number = int(value)
        exact = not isinstance(value, bool) and float(value) == number
    except (TypeError, ValueError, OverflowError):
        exact = False
    if not exact:
        raise ConfigError(f"{flag} {value!r}: not a whole number; give an integer >= {minimum}")
    if number < minimum:
        raise ConfigError(f"{flag} {value}: must be >= {minimum}")
    return number


def parse_int_list(flag: str, text: str, minimum: int = 1) -> list[int]:
    """"1,2,4" -> [1, 2, 4], each >= `minimum`; anything else (`abc`, `1,,x`, empty) is a ConfigError."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not p for p in parts):
        raise ConfigError(f"{flag} {text!r}: give comma-separated integers >= {minimum}, e.g. 1,2,4")
    values = []
    for p in parts:
        try:
            values.append(check_positive(flag, p, minimum))
        except ConfigError:
            raise ConfigError(f"{flag} {text!r}: {p!r} is not an integer >= {minimum}; give comma-separated "
                              "integers, e.g. 1,2,4") from None
    return values


def check_choices(flag: str, values: Iterable[str], allowed: Iterable[str]) -> list[str]:
    """Each of `values` must be one of `allowed` (e.g. `--backends nope` against the backend registry)."""
    allowed = list(allowed)
    values = list(values)
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ConfigError(f"{flag}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}")
    if not values:
        raise ConfigError(f"{flag}: empty; choose from {', '.join(allowed)}")
    return values


def nearest_existing(path: str | os.PathLike) -> Path:
    """`path` itself if it exists, else its closest existing ancestor."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_folder(folder: str | os.PathLike, what: str) -> None:
    """Fail fast unless `folder` exists as a writable folder or can be created: its closest existing ancestor
    must be a folder (not a file) in which a file can be created (probed, so read-only mounts count too).
    `what` names the flag for the message, e.g. "--out masks/"."""
    folder = Path(folder)
    base = nearest_existing(folder)
    if not base.is_dir():
        raise ConfigError(f"{what}: cannot create folder {folder}: {base} is a file, not a folder; choose another "
                          "path")
    try:
        with tempfile.TemporaryFile(dir=base, prefix=".fssam-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{what}: folder {base} is not writable ({exc.strerror or exc}); choose a writable "
                          "folder") from None
