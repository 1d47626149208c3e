"""Scoring: hand-computed cases, and the values the reference's intersectionAndUnionGPU + validate accumulation
gave on recorded random logits and labels (tests/data/eval/reference_metric*.{npz,json})."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fssam_deploy.eval.metrics import (
    Accumulator,
    episode_label,
    intersection_union,
    mask_iou,
    predict_mask,
    score,
)

from .conftest import DATA


def test_intersection_union_by_hand():
    pred = np.array([[1, 1, 0], [0, 1, 0]], bool)
    target = np.array([[1, 0, 0], [255, 1, 1]], np.uint8)  # (1, 0) ignored
    inter, union = intersection_union(pred, target)
    # valid: pred 1,1,0,1,0 ; target 1,0,0,1,1 -> fg inter 2, fg union 4; bg inter 1, bg union 3
    assert inter.tolist() == [1, 2] and union.tolist() == [3, 4]
    with pytest.raises(ValueError, match="differ in shape"):
        intersection_union(pred, target[:, :2])


def test_episode_label_and_threshold():
    label = np.array([[3, 5, 255, 0]], np.uint8)
    assert episode_label(label, 5).tolist() == [[0, 1, 255, 0]]
    logits = torch.tensor([[[-1e-9, 0.0], [1.0, -2.0]]])  # sigmoid(-1e-9) == 0.5 in float32: foreground
    assert predict_mask(logits, (2, 2)).tolist() == [[True, True], [True, False]]
    assert mask_iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    assert mask_iou(np.array([1, 1, 0]), np.array([1, 0, 1])) == pytest.approx(1 / 3)


def test_accumulation_by_hand():
    # class 1: two episodes (fg 2/4 then 3/6 -> 5/10); class 2: one (1/1); classes 3..5: none (count 0)
    s = score([(1, [5, 2], [7, 4]), (2, [9, 1], [9, 1]), (1, [1, 3], [4, 6])], [1, 2, 3, 4, 5])
    assert s.class_iou[1] == pytest.approx(0.5) and s.class_iou[2] == pytest.approx(1.0) and s.class_iou[3] == 0
    assert s.miou == pytest.approx(1.5 / 5)
    assert s.fg_iou == pytest.approx(6 / 11) and s.bg_iou == pytest.approx(15 / 20)
    assert s.fb_iou == pytest.approx((6 / 11 + 15 / 20) / 2)
    assert s.class_episodes == {1: 2, 2: 1, 3: 0, 4: 0, 5: 0} and s.episodes == 3
    with pytest.raises(ValueError, match="not one of the fold's classes"):
        Accumulator([1, 2]).add(7, [0, 0], [0, 0])


def test_matches_the_reference_metric_code():
    ref = json.loads((DATA / "reference_metrics.json").read_text())
    z = np.load(DATA / "reference_metric_inputs.npz")
    classes = [1, 2, 3, 4, 5]
    records = []
    for j, want in enumerate(ref["per_episode"]):
        pred = predict_mask(torch.from_numpy(z[f"logits{j}"]), z[f"label{j}"].shape)
        inter, union = intersection_union(pred, z[f"label{j}"])
        assert inter.tolist() == want["intersection"] and union.tolist() == want["union"], f"episode {j}"
        records.append((classes[int(z["subcls"][j])], inter, union))
    s = score(records, classes)
    assert s.miou == ref["miou"] and s.fb_iou == ref["fb_iou"] and s.fg_iou == ref["fg_iou"]  # float32, bit for bit
    assert [s.class_iou[c] for c in classes] == ref["class_iou"]
