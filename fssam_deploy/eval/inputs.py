"""One test episode's tensors from its files, as the reference's test transform makes them.

Query and supports are resized to the model size without keeping the aspect ratio (bilinear, no
antialiasing: cv2.INTER_LINEAR's sampling); support labels nearest (cv2.INTER_NEAREST's); the query's
label stays at its original size for scoring. Support masks: 1 where the label is the episode's class,
0 elsewhere (255 becomes 0, as the reference's model does with it). A missing file, or a label whose size
differs from its image's, is an InputError naming the files: an episode is never skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fssam_deploy.errors import InputError
from fssam_deploy.eval.datasets import read_label
from fssam_deploy.eval.episodes import EpisodeSpec
from fssam_deploy.eval.metrics import episode_label
from fssam_deploy.imageio import image_to_tensor, mask_to_tensor, read_image


@dataclass
class EpisodeInputs:
    query: torch.Tensor  # (1, 3, S, S) RGB 0..255
    supports: torch.Tensor  # (1, K, 3, S, S)
    masks: torch.Tensor  # (1, K, S, S) {0, 1}
    target: np.ndarray  # (H, W) uint8 {0, 1, 255} at the query's original size
    query_image: np.ndarray  # (H, W, 3) uint8, for overlays


def read_pair(root: Path, pair: tuple[str, str], role: str) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, label (H, W) uint8) of one list entry; sizes must agree."""
    img_path, label_path = root / pair[0], root / pair[1]
    if not img_path.is_file():
        raise InputError(f"{img_path}: {role} image not found (listed with label {pair[1]}; check --data-root)")
    img, label = read_image(img_path), read_label(label_path)
    if img.shape[:2] != label.shape:
        raise InputError(f"{label_path}: {role} label is {label.shape[1]}x{label.shape[0]} (WxH) but its image "
                         f"{img_path} is {img.shape[1]}x{img.shape[0]}; a label must have its image's size")
    return img, label


def load_episode(root: str | Path, spec: EpisodeSpec, size: int) -> EpisodeInputs:
    """The tensors of `spec` for a model of input side `size`."""
    root = Path(root)
    q_img, q_label = read_pair(root, spec.query, "query")
    imgs, masks = [], []
    for pair in spec.supports:
        s_img, s_label = read_pair(root, pair, "support")
        imgs.append(image_to_tensor(s_img, size))
        masks.append(mask_to_tensor((s_label == spec.cls).astype(np.float32), size))
    return EpisodeInputs(query=image_to_tensor(q_img, size)[None], supports=torch.stack(imgs)[None],
                         masks=torch.stack(masks)[None], target=episode_label(q_label, spec.cls), query_image=q_img)


def check_files(root: str | Path, episodes: list[EpisodeSpec]) -> None:
    """Before any model work: every image and label of `episodes` exists, is readable, and each label has its
    image's size (headers only, no decoding)."""
    from PIL import Image, UnidentifiedImageError

    root, seen = Path(root), set()
    for spec in episodes:
        for role, pair in [("query", spec.query)] + [("support", p) for p in spec.supports]:
            if pair in seen:
                continue
            seen.add(pair)
            sizes = []
            for kind, rel in zip(("image", "label"), pair):
                path = root / rel
                try:
                    with Image.open(path) as im:
                        sizes.append(im.size)
                except FileNotFoundError:
                    raise InputError(f"{path}: {role} {kind} of episode {spec.index} not found (check --data-root "
                                     "and the lists)") from None
                except (UnidentifiedImageError, OSError) as exc:
                    raise InputError(f"{path}: cannot read {role} {kind} of episode {spec.index} ({exc})") from None
            if sizes[0] != sizes[1]:
                raise InputError(f"{root / pair[1]}: {role} label is {sizes[1][0]}x{sizes[1][1]} (WxH) but its image "
                                 f"{root / pair[0]} is {sizes[0][0]}x{sizes[0][1]}; a label must have its image's size")
