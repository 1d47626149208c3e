"""AOTInductor runner: one `<stage>.pt2` package under the runner contract, and the episode over all stages.

Packages come from `backends.aoti.build.build_aoti`. The folder's manifest is read and checked once
(config, torch version, device type / GPU / CPU ISA) and handed to every runner, which checks its
package's sha256 before loading it; stale packages are refused with an `EngineError` that says to rebuild.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fssam_deploy.backends.aoti.manifest import REBUILD, read_aoti_manifest
from fssam_deploy.backends.base import Runner
from fssam_deploy.episode import Episode
from fssam_deploy.errors import EngineError
from fssam_deploy.manifest import Manifest
from fssam_deploy.model.config import FSSAMConfig
from fssam_deploy.stages import STAGE_SPECS


class AotiRunner(Runner):
    """One stage's AOTInductor package: `with AotiRunner(folder, "decoder") as r: r.infer({...})`.

    `packages`: the folder, or its manifest already read (`read_aoti_manifest`, as the episode hands it in);
    `expect_config`: refuse packages built for another config. `device`: where to run (default: the device type the
    packages were built for; "cuda:1" picks a GPU). Inputs are moved to it; outputs stay on it. Raises
    EngineError at construction for a missing or modified package.
    """

    def __init__(self, packages: str | Path | Manifest, stage: str, expect_config: FSSAMConfig | None = None,
                 device: str | torch.device | None = None):
        super().__init__()
        manifest = packages if isinstance(packages, Manifest) else read_aoti_manifest(packages, expect_config, device)
        if stage not in STAGE_SPECS:
            raise EngineError(f"{manifest.folder}: stage {stage!r} is not one this version knows; {REBUILD}")
        self.manifest = manifest
        self.device = torch.device(device or manifest["device"]["type"])
        self.path = manifest.artifact(stage, "package")
        self.spec = STAGE_SPECS[stage]
        self.name = f"aoti:{stage}"
        entry = manifest["stages"][stage]
        self.input_shapes = {i["name"]: tuple(i["shape"]) for i in entry["inputs"]}
        self.input_names = [i["name"] for i in entry["inputs"]]
        self.output_names = [o["name"] for o in entry["outputs"]]
        self.model = None

    def activate_impl(self) -> None:
        index = self.device.index if self.device.type == "cuda" and self.device.index is not None else -1
        try:
            self.model = torch._inductor.aoti_load_package(str(self.path), device_index=index)
        except Exception as exc:  # noqa: BLE001 - RuntimeError (zip, .so), KeyError, ...: an unloadable package
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise EngineError(f"{self.path}: cannot load the package of stage {self.spec.name!r} "
                              f"({type(exc).__name__}: {reason}); {REBUILD}") from None
        stage = self.model.get_metadata().get("fssam_stage")
        if stage is not None and stage != self.spec.name:
            raise EngineError(f"{self.path}: package holds stage {stage!r}, not {self.spec.name!r}; {REBUILD}")

    def deactivate_impl(self) -> None:
        self.model = None

    def infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = [feed[n].to(self.device).contiguous() for n in self.input_names]
        with torch.inference_mode():
            outs = self.model(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so that last_latency_s is the kernels' time
        outs = outs if isinstance(outs, (list, tuple)) else (outs,)
        return dict(zip(self.output_names, outs))


def aoti_episode(package_dir: str | Path, expect_config: FSSAMConfig | None = None,
                 device: str | torch.device | None = None) -> Episode:
    """`segment(query, supports, masks) -> logits (B, 1, S, S)` through one AOTI package per stage.

    A larger batch than the packages' static one runs in chunks. `close()` releases the loaded packages.
    """
    manifest = read_aoti_manifest(package_dir, expect_config, device)
    manifest.check_stages(STAGE_SPECS)
    device = torch.device(device or manifest["device"]["type"])
    runners = {name: AotiRunner(manifest, name, device=device) for name in STAGE_SPECS}
    episode = Episode(runners, manifest.config, device)
    episode.manifest = manifest
    episode.settings = {"engine_dir": str(package_dir), "package_batch": manifest["batch"],
                        "precision": manifest.get("precision", "fp32"),
                        "note": "static-batch packages: larger batches run in chunks"}
    return episode
