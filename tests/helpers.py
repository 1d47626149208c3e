"""Helpers the tests share: golden vectors, benchmark scripts as modules, the synthetic episode, tiny graphs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from fssam_deploy.parity import StageTolerance

GOLDEN = Path(__file__).parent / "data" / "golden"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """The script benchmarks/<name>.py as a module (scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_golden(name: str) -> tuple[dict, dict, dict]:
    """-> (arrays as tensors, state_dict, meta) of tests/data/golden/<name>.npz."""
    z = np.load(GOLDEN / f"{name}.npz", allow_pickle=False)
    arrays, sd = {}, {}
    for k in z.files:
        if k.startswith("state_dict."):
            sd[k[len("state_dict.") :]] = torch.from_numpy(z[k])
        elif k != "meta":
            a = z[k]
            arrays[k] = torch.from_numpy(a) if a.dtype.kind in "fiub" else a
    return arrays, sd, json.loads(str(z["meta"]))


def make_episode(cfg, batch: int = 1, shots: int | None = None, seed: int = 0):
    """Smooth random images (0..255) and rectangular support masks."""
    g = torch.Generator().manual_seed(seed)
    s, k = cfg.image_size, shots or cfg.shots

    def smooth(n):
        low = torch.rand(n, 3, 8, 8, generator=g) * 255
        return torch.nn.functional.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)

    query = smooth(batch)
    supports = smooth(batch * k).reshape(batch, k, 3, s, s)
    masks = torch.zeros(batch, k, s, s)
    for b in range(batch):
        for i in range(k):
            y0, x0 = torch.randint(0, s // 2, (2,), generator=g).tolist()
            h, w = torch.randint(s // 8, s // 2, (2,), generator=g).tolist()
            masks[b, i, y0 : y0 + h, x0 : x0 + w] = 1
    return query, supports, masks




TINY_FLAGS = ["--sam2-config", "sam2_hiera_t", "--dino", "dinov2_vits14", "--image-size", "256"]


def export_tiny_graphs(out: Path) -> Path:
    """The tiny config's six graphs (fp32, dynamic batch, seed 0) through `fssam export`, and the plugin variant."""
    from fssam_deploy.cli import main
    from fssam_deploy.model import FSSAMConfig
    from fssam_deploy.onnx.plugin_variant import export_plugin_variants

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", *TINY_FLAGS, "--seed", "0", "--batch", "dynamic", "--out", str(out),
                     "--no-progress"]) == 0
        export_plugin_variants(FSSAMConfig.from_name("tiny"), out, seed=0)
    return out


def build_tiny_aoti(folder: Path) -> Path:
    """Every stage of the tiny config as AOTInductor packages for the CPU, through `fssam build --format aoti` from
    a checkpoint (`folder/ckpt.pth`) of seed-0 random weights, so the eager stages of seed 0 are its reference.
    Returns the packages folder, `folder/aoti`."""
    from fssam_deploy.cli import main
    from fssam_deploy.model import FSSAMConfig, random_weights, save_fssam_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    save_fssam_checkpoint(random_weights(FSSAMConfig.from_name("tiny"), 0), folder / "ckpt.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["build", "--format", "aoti", *TINY_FLAGS, "--checkpoint", str(folder / "ckpt.pth"),
                     "--out", str(folder / "aoti"), "--no-progress"]) == 0
    return folder / "aoti"


def assert_bf16_rounded_close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = 1e-4) -> None:
    """`got` == `want` for an output its spec marks bf16-rounded (the memory), by the rule `fssam verify` applies
    (`parity.StageTolerance`): fewer than 0.1% of the elements beyond `rtol` x scale, none beyond one bf16 step."""
    c = StageTolerance(rtol, bf16_rounded=True).check(got, want)
    assert c["ok"], (f"{what}: {c['off']:.2%} of the elements differ by more than {rtol} x scale {c['scale']:.3g}, "
                     f"max {c['max_abs']:.3g} (bf16 step {2**-7 * c['scale']:.3g}): is the bf16 rounding kept?")


def copy_graphs(src: Path, dst: Path) -> Path:
    """A private copy of a graph folder, for tests that modify one."""
    import shutil

    return Path(shutil.copytree(src, dst))


def folder_files(folder: Path) -> set[str]:
    """Every file under `folder`, relative."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
