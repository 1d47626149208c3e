"""AOTInductor runner: one `<stage>.pt2` package under the runner contract, and the episode over all stages.

Packages come from `fssam_deploy.export.aoti.build_aoti`. Loading one checks its manifest first
(config, torch version, device type / GPU / CPU ISA, package sha256) and refuses stale packages
with an `EngineError` that says to rebuild.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import EngineError
from ..export.aoti_manifest import REBUILD, check_package, read_aoti_manifest
from ..export.specs import STAGE_SPECS
from ..model.config import FSSAMConfig
from .base import Runner
from .episode import Episode


class AotiRunner(Runner):
    """One stage's AOTInductor package: `with AotiRunner(dir, "decoder") as r: r.infer({name: tensor})`.

    `expect_config`: refuse packages built for another config. `device`: where to run (default:
    the device type the packages were built for; "cuda:1" picks a GPU). Inputs are moved to it;
    outputs stay on it. Raises EngineError at construction for stale or missing packages.
    """

    def __init__(self, package_dir: str | Path, stage: str, expect_config: FSSAMConfig | None = None,
                 device: str | torch.device | None = None):
        super().__init__()
        self.package_dir = Path(package_dir)
        self.manifest = read_aoti_manifest(self.package_dir, expect_config, device)
        self.device = torch.device(device or self.manifest["device"]["type"])
        self.path = check_package(self.package_dir, self.manifest, stage)
        if stage not in STAGE_SPECS:
            raise EngineError(f"{self.path}: stage {stage!r} is not one this version knows; {REBUILD}")
        self.spec = STAGE_SPECS[stage]
        self.name = f"aoti:{stage}"
        entry = self.manifest["stages"][stage]
        self.input_shapes = {i["name"]: tuple(i["shape"]) for i in entry["inputs"]}
        self.input_names = [i["name"] for i in entry["inputs"]]
        self.output_names = [o["name"] for o in entry["outputs"]]
        self.model = None

    def activate_impl(self) -> None:
        index = self.device.index if self.device.type == "cuda" and self.device.index is not None else -1
        self.model = torch._inductor.aoti_load_package(str(self.path), device_index=index)
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


class AotiEpisode(Episode):
    """`segment(query, supports, masks) -> logits (B, 1, S, S)` through one AOTI package per stage.

    An `Episode` over `AotiRunner`s: the same composition as `Pipeline.encode_supports` +
    `segment_query` and as the ONNX episode; `with_supports(...)` encodes a support set (its
    DINOv2 features included) once. A larger batch than the packages' static one runs in chunks.
    `close()` releases the loaded packages.
    """

    def __init__(self, package_dir: str | Path, expect_config: FSSAMConfig | None = None,
                 device: str | torch.device | None = None):
        self.engine_dir = Path(package_dir)
        self.manifest = read_aoti_manifest(self.engine_dir, expect_config, device)
        cfg = FSSAMConfig.from_dict(self.manifest["config"])
        device = torch.device(device or self.manifest["device"]["type"])
        runners = {name: AotiRunner(self.engine_dir, name, expect_config, device) for name in STAGE_SPECS}
        super().__init__(runners, cfg, device)
