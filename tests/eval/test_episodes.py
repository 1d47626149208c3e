"""Episode lists: the reference's loader's sequence (recorded by running its SemData + DataLoader + validate loop
on the synthetic dataset), lists read and built by its rules, episodes.json round trip."""

from __future__ import annotations

import json

import pytest

from fssam_deploy.errors import InputError
from fssam_deploy.eval.datasets import fold_classes, open_lists, relative, write_lists
from fssam_deploy.eval.episodes import read_episodes, sample_episodes, write_episodes


def _reference_list(run: dict) -> list:
    rel = lambda p: relative(p, "pascal")  # noqa: E731
    return [((rel(q[0]), rel(q[1])), c, tuple((rel(a), rel(b)) for a, b in s)) for q, c, s in run["list"]]


@pytest.mark.parametrize("key", ["fold0_shot1_workers32", "fold0_shot5_workers3", "fold0_shot1_workers0",
                                 "fold0_shot1_workers4"])
def test_sequence_is_the_reference_loaders(voc_root, reference_runs, key):
    run = reference_runs[key]
    fss = open_lists("pascal", voc_root, run["fold"])
    assert len(fss.items) == run["list_len"]
    eps = sample_episodes(fss, run["shots"], run["episodes"], workers=run["workers"])
    assert [(e.query, e.cls, e.supports) for e in eps] == _reference_list(run)


def test_prefix_and_worker_count_matter(voc_root, reference_runs):
    fss = open_lists("pascal", voc_root, 0)
    full = sample_episodes(fss, 1, 80, workers=32)
    assert sample_episodes(fss, 1, 7, workers=32) == full[:7]  # --episodes N: a prefix of the protocol
    other = sample_episodes(fss, 1, 80, workers=4)
    assert [(e.cls, e.supports) for e in other] != [(e.cls, e.supports) for e in full]
    assert sample_episodes(fss, 1, 80, seed=322, workers=32) != full


def test_lists_built_equal_reference_format_lists(voc_root, tmp_path):
    built = open_lists("pascal", voc_root, 0)
    # the reference's fss_list files carry its data_root prefix; they map onto any --data-root
    d = tmp_path / "lists" / "fss_list" / "val"
    d.mkdir(parents=True)
    prefix = "../data/VOCdevkit2012/VOC2012/"
    (d / "data_list_0.txt").write_text("".join(f"{prefix}{i} {prefix}{m}\n" for i, m in built.items))
    (d / "sub_class_file_list_0.txt").write_text(
        str({c: [(prefix + i, prefix + m) for i, m in v] for c, v in built.class_files.items()}))
    read = open_lists("pascal", voc_root, 0, lists=tmp_path / "lists")
    assert read.items == built.items and read.class_files == built.class_files
    again = open_lists("pascal", voc_root, 0, lists=write_lists(built, tmp_path / "ours"))
    assert again.items == built.items and again.class_files == built.class_files


def test_list_rule_counts_big_classes_only(voc_root):
    fss = open_lists("pascal", voc_root, 0)
    # a query may hold fold classes too small to be listed: SemData still draws among them
    small = [it for it in fss.items if any(it not in fss.class_files[c] for c in fss.query_classes(it))]
    assert small, "the synthetic set should hold queries with a small (< 2048 px) fold-0 object"


def test_fold_classes():
    assert fold_classes("pascal", 2) == [11, 12, 13, 14, 15]
    assert fold_classes("coco", 0)[:3] == [1, 5, 9] and len(fold_classes("coco", 3)) == 20
    with pytest.raises(Exception, match="--fold 4"):
        fold_classes("pascal", 4)


def test_too_few_supports_is_an_error(voc_root):
    fss = open_lists("pascal", voc_root, 1)  # fold 1 classes are rare in the synthetic set
    with pytest.raises(InputError, match=r"class \d+: \d support candidate\(s\).*loop forever"):
        sample_episodes(fss, 5, 20)


def test_episodes_json_round_trip(voc_root, tmp_path):
    fss = open_lists("pascal", voc_root, 0)
    eps = sample_episodes(fss, 5, 12, workers=3)
    path = write_episodes(tmp_path / "episodes.json", eps, {"dataset": "pascal", "fold": 0, "shots": 5})
    meta, back = read_episodes(path)
    assert back == eps and meta["fold"] == 0
    doc = json.loads(path.read_text())
    assert doc["episodes"][0]["supports"][0].keys() == {"image", "label"}
    path.write_text('{"format": "other"}')
    with pytest.raises(InputError, match="not an episode list"):
        read_episodes(path)


def test_missing_lists_are_errors(voc_root, tmp_path):
    with pytest.raises(InputError, match=r"--lists .*data_list_0.txt"):
        open_lists("pascal", voc_root, 0, lists=tmp_path)
    with pytest.raises(InputError, match=r"ImageSets/Segmentation/val.txt: not found"):
        open_lists("pascal", tmp_path, 0)


def test_reference_list_paths_map_to_the_data_root():
    assert relative("../data/MSCOCO2014/annotations/val2014/COCO_val2014_1.png", "coco") == \
        "annotations/val2014/COCO_val2014_1.png"
    assert relative("../data/MSCOCO2014/val2014/COCO_val2014_1.jpg", "coco") == "val2014/COCO_val2014_1.jpg"
    assert relative("../data/VOCdevkit2012/VOC2012/JPEGImages/a.jpg", "pascal") == "JPEGImages/a.jpg"
    assert relative("SegmentationClassAug/a.png", "pascal") == "SegmentationClassAug/a.png"
