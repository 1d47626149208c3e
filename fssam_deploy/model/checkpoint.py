"""Checkpoint formats: FSSAM trained, SAM 2 official, DINOv2 hub. Strict loading."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

from fssam_deploy.errors import CheckpointError
from fssam_deploy.model.fssam import FSSAMWeights, random_weights

FORMAT_FSSAM = "fssam"  # {"epoch", "state_dict": {"sam2.*", "dino.*"}, "optimizer"}, maybe "module."
FORMAT_SAM2 = "sam2"  # {"model": SAM2Base state dict}
FORMAT_DINO = "dinov2"  # DINOv2 hub state dict (cls_token, pos_embed, mask_token, blocks.*)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """torch.load with weights_only=True and errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated, not a torch file: torch raises many types
        raise CheckpointError(f"{path}: cannot read checkpoint ({_torch_reason(exc)}); it is corrupt, truncated, "
                              "not written by torch.save, or holds objects other than tensors and plain containers "
                              "(refused by weights-only loading)") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def _torch_reason(exc: BaseException) -> str:
    """The one line of torch's (often multi-line) load error that says what failed."""
    text = str(exc)
    marker = "WeightsUnpickler error:"  # weights_only refusals: the reason follows, after advice not to follow
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def strip_prefix(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def split_fssam_state_dict(obj: dict, path) -> tuple[dict, dict]:
    """FSSAM trained format -> (sam2 state dict, DINOv2 hub state dict)."""
    sd = obj.get("state_dict", obj)
    if all(k.startswith("module.") for k in sd):
        sd = strip_prefix(sd, "module.")
    other = sorted(k for k in sd if not k.startswith(("sam2.", "dino.")))
    if other:
        raise CheckpointError(
            f"{path}: not an FSSAM checkpoint: keys outside sam2.* / dino.*: {other[:8]}"
            f"{' ...' if len(other) > 8 else ''}"
        )
    return strip_prefix(sd, "sam2."), strip_prefix(sd, "dino.")


def _describe(keys: list[str]) -> str:
    return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")


def load_strict(module: torch.nn.Module, sd: dict, path, what: str) -> None:
    """load_state_dict(strict) with an error that names the file and the keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(sd) & set(own)) if tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_describe(shapes)}")
        raise CheckpointError(
            f"{path}: {what} weights do not fit this architecture ({'; '.join(parts)}). "
            "Check --sam2-config / --dino against the checkpoint."
        )
    module.load_state_dict(sd, strict=True)


def dino_hub_to_timm(sd: dict, vit: torch.nn.Module) -> dict:
    from timm.models.vision_transformer import checkpoint_filter_fn

    if "mask_token" not in sd:
        raise CheckpointError("DINOv2 weights lack 'mask_token': not the DINOv2 hub format")
    return checkpoint_filter_fn(dict(sd), vit)


def read_weight_files(checkpoint=None, sam2_checkpoint=None, dino_checkpoint=None) -> tuple[tuple, tuple]:
    """((SAM 2 state dict, file, label), (DINOv2 hub state dict, file, label)) from an FSSAM checkpoint, or a SAM 2
    official checkpoint plus a DINOv2 hub state dict: read and checked before any model is built."""
    if checkpoint is not None:
        if sam2_checkpoint or dino_checkpoint:
            raise CheckpointError("give either an FSSAM checkpoint or SAM 2 + DINOv2 checkpoints, not both")
        sam2_sd, dino_sd = split_fssam_state_dict(read_checkpoint(checkpoint), checkpoint)
        return (sam2_sd, checkpoint, "SAM 2 (sam2.*)"), (dino_sd, checkpoint, "DINOv2 (dino.*)")
    if not (sam2_checkpoint and dino_checkpoint):
        raise CheckpointError("without an FSSAM checkpoint, both a SAM 2 and a DINOv2 checkpoint are needed")
    obj = read_checkpoint(sam2_checkpoint)
    if "model" not in obj:
        raise CheckpointError(f"{sam2_checkpoint}: not a SAM 2 checkpoint (no 'model' key; keys: {list(obj)[:5]})")
    dino_sd = read_checkpoint(dino_checkpoint)
    return (obj["model"], sam2_checkpoint, "SAM 2"), (dino_sd.get("model", dino_sd), dino_checkpoint, "DINOv2")


def load_weights(
    weights: FSSAMWeights,
    checkpoint: str | os.PathLike | None = None,
    sam2_checkpoint: str | os.PathLike | None = None,
    dino_checkpoint: str | os.PathLike | None = None,
    files: tuple | None = None,
) -> None:
    """Load an FSSAM checkpoint, or a SAM 2 official checkpoint plus a DINOv2 hub state dict (`files`: what
    `read_weight_files` already read)."""
    (sam2_sd, sam2_path, sam2_what), (dino_sd, dino_path, dino_what) = files or read_weight_files(
        checkpoint, sam2_checkpoint, dino_checkpoint)
    load_strict(weights.sam2, sam2_sd, sam2_path, sam2_what)
    load_strict(weights.dino, dino_hub_to_timm(dino_sd, weights.dino), dino_path, dino_what)


def dino_timm_to_hub(vit: torch.nn.Module) -> dict:
    """The DINOv2 hub state dict of a timm DINOv2 ViT (adds the unused `mask_token`)."""
    sd = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    sd["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return sd


def _atomic_save(obj, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_fssam_checkpoint(weights: FSSAMWeights, path, module_prefix: bool = False) -> None:
    """Write the trained-FSSAM format (`best_1shot.pth` style)."""
    pre = "module." if module_prefix else ""
    sd = {f"{pre}sam2.{k}": v for k, v in weights.sam2.state_dict().items()}
    sd.update({f"{pre}dino.{k}": v for k, v in dino_timm_to_hub(weights.dino).items()})
    _atomic_save({"epoch": 0, "state_dict": sd, "optimizer": {}}, path)


def save_sam2_checkpoint(weights: FSSAMWeights, path) -> None:
    _atomic_save({"model": weights.sam2.state_dict()}, path)


def save_dino_checkpoint(weights: FSSAMWeights, path) -> None:
    _atomic_save(dino_timm_to_hub(weights.dino), path)


def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


RANDOM_WEIGHTS_WARNING = (
    "FSSAM is running with RANDOM weights (no checkpoint given): fine for export and speed "
    "work, but its masks mean nothing"
)


def make_weights(cfg, checkpoint=None, sam2_checkpoint=None, dino_checkpoint=None, seed: int = 0,
                 warn: bool = True) -> FSSAMWeights:
    """The weights every command uses: loaded from the checkpoint(s), or drawn from `seed` (with a warning)."""
    files = None
    if checkpoint or sam2_checkpoint or dino_checkpoint:  # a bad file fails before the model is built
        files = read_weight_files(checkpoint or None, sam2_checkpoint, dino_checkpoint)
    weights = random_weights(cfg, seed)
    if files is not None:
        load_weights(weights, files=files)
    elif warn:
        warnings.warn(RANDOM_WEIGHTS_WARNING, stacklevel=2)
    return weights
