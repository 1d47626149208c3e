"""Scoring as the reference's `validate` (test.py) and `intersectionAndUnionGPU` (util/util.py) do it.

Per episode: the logits (model size) are resized to the original label's size (bilinear, align_corners=True),
the mask is sigmoid >= 0.5, and pixels labelled 255 are ignored; intersection and union are counted for
background (0) and foreground (1). Over the episodes: FB-IoU is the mean over {bg, fg} of summed
intersection / summed union; the accumulated foreground IoU is its fg term; mIoU (the headline) is, per
fold class, the foreground intersection / union summed over that class's episodes, averaged over all the
fold's classes (a class without episodes counts as 0, as in the reference). The sums run in float32 in
episode order with the reference's 1e-10, as its numpy 2 `AverageMeter`s do, so the numbers are its numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fssam_deploy.eval.datasets import IGNORE

EPS = 1e-10


def episode_label(label: np.ndarray, cls: int) -> np.ndarray:
    """A raw class-index label -> the episode's target: 1 where `cls`, 255 where 255, else 0."""
    out = (label == cls).astype(np.uint8)
    out[label == IGNORE] = IGNORE
    return out


def predict_mask(logits: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(…, S, S) logits of one query -> (H, W) bool mask at the label's size (the reference's resize)."""
    t = logits.reshape(1, 1, *logits.shape[-2:]).float()
    full = F.interpolate(t, size=tuple(hw), mode="bilinear", align_corners=True)[0, 0]
    return torch.sigmoid(full) >= 0.5


def intersection_union(pred, target) -> tuple[np.ndarray, np.ndarray]:
    """(intersection, union), each [background, foreground] pixel counts; `target` 255 is ignored."""
    pred = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred).astype(bool)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    valid = target != IGNORE
    p, t = pred[valid], target[valid] == 1
    inter = np.array([(~p & ~t).sum(), (p & t).sum()], np.int64)
    area_p = np.array([(~p).sum(), p.sum()], np.int64)
    area_t = np.array([(~t).sum(), t.sum()], np.int64)
    return inter, area_p + area_t - inter


def mask_iou(a, b) -> float:
    """IoU of two boolean masks (1.0 when both are empty): how much two backends agree on an episode."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@dataclass
class Scores:
    """The accumulated metrics of one backend over a set of episodes."""

    miou: float
    fb_iou: float
    fg_iou: float
    bg_iou: float
    class_iou: dict[int, float]
    class_episodes: dict[int, int]
    episodes: int

    def to_json(self) -> dict:
        return {"miou": self.miou, "fb_iou": self.fb_iou, "fg_iou": self.fg_iou, "bg_iou": self.bg_iou,
                "class_iou": {str(c): v for c, v in self.class_iou.items()},
                "class_episodes": {str(c): n for c, n in self.class_episodes.items()}, "episodes": self.episodes}


@dataclass
class Accumulator:
    """validate()'s meters: add episodes in order, then `scores()`."""

    classes: list[int]
    inter: np.ndarray = field(default_factory=lambda: np.zeros(2, np.float32))
    union: np.ndarray = field(default_factory=lambda: np.zeros(2, np.float32))
    class_inter: dict = field(default_factory=dict)
    class_union: dict = field(default_factory=dict)
    class_count: dict = field(default_factory=dict)
    count: int = 0

    def add(self, cls: int, inter, union) -> None:
        if cls not in self.classes:
            raise ValueError(f"class {cls} is not one of the fold's classes {self.classes}")
        inter, union = np.asarray(inter, np.float32), np.asarray(union, np.float32)
        self.inter = self.inter + inter
        self.union = self.union + union
        self.class_inter[cls] = self.class_inter.get(cls, np.float32(0)) + inter[1]
        self.class_union[cls] = self.class_union.get(cls, np.float32(0)) + union[1]
        self.class_count[cls] = self.class_count.get(cls, 0) + 1
        self.count += 1

    def scores(self) -> Scores:
        iou = self.inter / (self.union + np.float32(EPS))  # (2,) float32: [bg, fg]
        class_iou = {c: float(self.class_inter[c] / (self.class_union[c] + np.float32(EPS)))
                     if c in self.class_inter else 0.0 for c in self.classes}
        miou = np.float32(0)
        for c in self.classes:
            miou = miou + np.float32(class_iou[c])
        return Scores(miou=float(miou * 1.0 / len(self.classes)), fb_iou=float(np.mean(iou)), fg_iou=float(iou[1]),
                      bg_iou=float(iou[0]), class_iou=class_iou,
                      class_episodes={c: self.class_count.get(c, 0) for c in self.classes}, episodes=self.count)


def score(records, classes: list[int]) -> Scores:
    """Scores of (class, intersection, union) records taken in episode order."""
    acc = Accumulator(list(classes))
    for cls, inter, union in records:
        acc.add(cls, inter, union)
    return acc.scores()
