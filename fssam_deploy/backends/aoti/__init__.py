"""AOTInductor backends: every stage compiled ahead of time into a `.pt2` package (`fssam build --format aoti`).

`aoti`: fp32 packages; `aoti-bf16`: each stage compiled under bf16 autocast (the reference's GPU precision).
Packages are native code for the torch build and the device (GPU model / CPU vector ISA) that built them.
"""

from __future__ import annotations

from pathlib import Path

from fssam_deploy.backends.aoti.build import build_aoti
from fssam_deploy.backends.aoti.manifest import AOTI_FORMAT
from fssam_deploy.backends.aoti.runner import aoti_episode
from fssam_deploy.backends.registry import Backend, BuildRequest, LoadRequest, register
from fssam_deploy.episode import Episode
from fssam_deploy.errors import ConfigError


def _build(req: BuildRequest) -> Path:
    """`fssam build --format aoti`: packages for `req.device` from the checkpoint (or random `seed`)."""
    try:
        batch = int(req.batch)
    except ValueError:
        raise ConfigError(f"--batch {req.batch!r}: AOTInductor packages take one static batch size (an int)") from None
    return build_aoti(req.cfg, req.out, checkpoint=req.checkpoint, seed=req.seed, device=req.device, batch=batch,
                      precision=req.precision, progress=req.progress, force=req.force)


def _load(precision: str):
    def load(req: LoadRequest) -> Episode:
        engine_dir = req.engine_dir
        if engine_dir is None:  # benchmarks without --engine-dir: compile here (static batch 1)
            engine_dir = build_aoti(req.cfg, req.workdir / "aoti", req.checkpoint, req.seed, device=req.device,
                                    precision=precision, progress=False)
        return aoti_episode(engine_dir, expect_config=req.cfg, device=req.device)

    return load


register(Backend("aoti", "aoti", "AOTInductor packages, fp32 (CPU or CUDA)", _load("fp32"), engine_format=AOTI_FORMAT,
                 engine_source="fssam build --format aoti", build=_build, build_format="aoti",
                 tune=("cuda",)))  # on the CPU: minutes of compilation for eager speed (1.02x, tiny config)
register(Backend("aoti-bf16", "aoti", "AOTInductor packages compiled under bf16 autocast", _load("bf16"),
                 engine_format=AOTI_FORMAT, engine_source="fssam build --format aoti --precision bf16",
                 build=_build, precision="bf16", accuracy="fast", tune=("cuda",)))
