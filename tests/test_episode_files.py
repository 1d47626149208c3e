"""plan_outputs: outputs never overwrite inputs or each other; --out / --logits / --overlay checked before any work."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fssam_deploy.episode_files import OutputPlan, load_supports, output_names, plan_outputs, segment_queries
from fssam_deploy.errors import ConfigError, InputError


def img(path: Path, size=(6, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), 100, np.uint8)).save(path)
    return path


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- outputs never replace inputs ---------------------------------------------------------------------------------

def test_out_equal_to_the_query_is_refused(tmp_path):
    """Issue 16: `--query v.png --out v.png` overwrote the query with its mask."""
    q = img(tmp_path / "v.png")
    before = snapshot(tmp_path)
    with pytest.raises(InputError, match=r"--out .*v\.png: the result for .*v\.png would be written to .*v\.png, "
                                         r"overwriting the input .*v\.png; choose another --out"):
        plan_outputs([q], tmp_path / "v.png")
    assert snapshot(tmp_path) == before


def test_query_folder_as_out_folder(tmp_path):
    """Issue 16: `--query dir --out dir` overwrote dir/x.png; dir/x.jpg -> dir/x.png is fine (not an input)."""
    d = tmp_path / "dir"
    a, b = img(d / "x.png"), img(d / "y.jpg")
    with pytest.raises(InputError, match=r"overwriting the input .*dir/x\.png"):
        plan_outputs([a, b], d)
    assert [p.mask for p in plan_outputs([b], d)] == [d / "y.png"]  # an existing folder: <stem>.png inside


def test_out_may_not_be_a_support_or_mask(tmp_path):
    q, s, m = img(tmp_path / "q.jpg"), img(tmp_path / "s.jpg"), img(tmp_path / "s.png")
    with pytest.raises(InputError, match=r"overwriting the input .*s\.png"):
        plan_outputs([q], tmp_path / "s.png", inputs=[s, m])
    with pytest.raises(InputError, match=r"--overlay .*s\.jpg: .*overwriting the input .*s\.jpg"):
        plan_outputs([q], tmp_path / "m.png", overlay=tmp_path / "s.jpg", inputs=[s, m])


def test_links_to_inputs_are_refused(tmp_path):
    q = img(tmp_path / "q.png")
    (tmp_path / "sym.png").symlink_to(q)
    os.link(q, tmp_path / "hard.png")
    for name in ("sym.png", "hard.png"):
        with pytest.raises(InputError, match=r"overwriting the input .*q\.png"):
            plan_outputs([q], tmp_path / name)


# --- outputs never replace each other -----------------------------------------------------------------------------

def test_same_stem_queries_get_distinct_names(tmp_path):
    """Issue 16: x.jpg and x.png in one query folder both wrote x.png (the first mask was lost)."""
    qs = [img(tmp_path / "q" / "x.jpg"), img(tmp_path / "q" / "x.png"), img(tmp_path / "q" / "y.png")]
    plan = plan_outputs(qs, tmp_path / "out", logits=tmp_path / "lg", overlay=tmp_path / "ov")
    assert [p.mask.name for p in plan] == ["x_jpg.png", "x_png.png", "y.png"]
    assert [p.logits.name for p in plan] == ["x_jpg.npy", "x_png.npy", "y.npy"]
    assert plan[0] == OutputPlan(qs[0], tmp_path / "out" / "x_jpg.png", tmp_path / "lg" / "x_jpg.npy",
                                 tmp_path / "ov" / "x_jpg.png")
    assert output_names([Path("a/x.JPG"), Path("a/x.png")]) == ["x_jpg", "x_png"]


def test_unresolvable_collision_is_refused(tmp_path):
    qs = [img(tmp_path / "a" / "x.jpg"), img(tmp_path / "b" / "x.jpg")]
    with pytest.raises(InputError, match=r"--out and --out would both write .*out/x_jpg\.png \(for .*a/x\.jpg and "
                                         r".*b/x\.jpg\); give them different folders"):
        plan_outputs(qs, tmp_path / "out")


def test_mask_and_overlay_in_one_folder_collide(tmp_path):
    qs = [img(tmp_path / "a.jpg"), img(tmp_path / "b.jpg")]
    with pytest.raises(InputError, match=r"--out and --overlay would both write .*res/a\.png"):
        plan_outputs(qs, tmp_path / "res", overlay=tmp_path / "res")
    with pytest.raises(InputError, match=r"--out and --overlay would both write .*same\.png"):
        plan_outputs(qs[:1], tmp_path / "same.png", overlay=tmp_path / "same.png")


def test_a_query_given_twice_is_planned_once(tmp_path):
    q = img(tmp_path / "q.jpg")
    plan = plan_outputs([q, tmp_path / "." / "q.jpg"], tmp_path / "m.png")
    assert [p.mask for p in plan] == [tmp_path / "m.png"]


# --- the form of --out / --logits / --overlay ---------------------------------------------------------------------

def test_several_queries_need_folders(tmp_path):
    qs = [img(tmp_path / "a.jpg"), img(tmp_path / "b.jpg")]
    with pytest.raises(ConfigError, match=r"--out .*m\.png: with 2 queries --out is a folder \(one \.png per query\)"):
        plan_outputs(qs, tmp_path / "m.png")
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ConfigError, match=r"--out .*taken: 2 queries write one \.png file each, so --out must be a "
                                          r"folder, but .*taken is a file"):
        plan_outputs(qs, tmp_path / "taken")
    with pytest.raises(ConfigError, match=r"--logits .*l\.npy: with 2 queries --logits is a folder"):
        plan_outputs(qs, tmp_path / "out", logits=tmp_path / "l.npy")


@pytest.mark.parametrize("flag,kw,value,match", [
    ("--out", "out", "mask", r"--out .*mask: the mask file needs one of the extensions \.bmp, \.png, \.tif, \.tiff "
                             r"\(e\.g\. mask\.png\), or give a folder \(ending in /\)"),
    ("--out", "out", "mask.jpg", r"--out .*mask\.jpg: the mask file needs one of the extensions"),
    ("--logits", "logits", "l.txt", r"--logits .*l\.txt: the logits file needs one of the extensions \.npy"),
    ("--overlay", "overlay", "o", r"--overlay .*o: the overlay file needs one of the extensions"),
])
def test_one_query_file_extensions(tmp_path, flag, kw, value, match):
    q = img(tmp_path / "q.jpg")
    args = {"out": tmp_path / "m.png", kw: tmp_path / value}
    with pytest.raises(ConfigError, match=match):
        plan_outputs([q], **args)


def test_one_query_into_a_folder(tmp_path):
    q = img(tmp_path / "q.jpg")
    (tmp_path / "existing").mkdir()
    assert plan_outputs([q], tmp_path / "existing")[0].mask == tmp_path / "existing" / "q.png"
    assert plan_outputs([q], f"{tmp_path}/new/")[0].mask == tmp_path / "new" / "q.png"
    assert not (tmp_path / "new").exists()  # planning creates nothing


def test_output_that_is_a_folder_is_refused(tmp_path):
    qs = [img(tmp_path / "a.jpg"), img(tmp_path / "b.jpg")]
    (tmp_path / "out" / "a.png").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"--out: .*out/a\.png is a folder, so the result for .*a\.jpg cannot be "
                                          r"written there"):
        plan_outputs(qs, tmp_path / "out")


# --- output folders writable --------------------------------------------------------------------------------------

def test_output_under_a_file_is_refused(tmp_path):
    """Issue 16: --out under a file, and --logits in a folder that cannot exist, failed after the mask was written."""
    q = img(tmp_path / "q.jpg")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"--out .*afile/m\.png: cannot create folder .*afile: .*afile is a file"):
        plan_outputs([q], tmp_path / "afile" / "m.png")
    with pytest.raises(ConfigError, match=r"--logits .*afile/sub/l\.npy: cannot create folder .*afile/sub: "
                                          r".*afile is a file"):
        plan_outputs([q], tmp_path / "m.png", logits=tmp_path / "afile" / "sub" / "l.npy")
    plan = plan_outputs([q], tmp_path / "m.png", logits=tmp_path / "not" / "yet" / "l.npy")  # creatable: fine
    assert plan[0].logits == tmp_path / "not" / "yet" / "l.npy"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused(tmp_path):
    q = img(tmp_path / "q.jpg")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=r"--out .*ro/m\.png: folder .*ro is not writable"):
            plan_outputs([q], ro / "m.png")
    finally:
        ro.chmod(0o755)


def test_unwritable_output_folder_is_refused(tmp_path, monkeypatch):
    """The same refusal where the probe write fails (read-only mount, or a read-only folder for non-root)."""
    import tempfile

    q = img(tmp_path / "q.jpg")

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(ConfigError, match=r"--out .*m\.png: folder .* is not writable \(Permission denied\); choose a "
                                          r"writable folder"):
        plan_outputs([q], tmp_path / "m.png")


def test_missing_arguments(tmp_path):
    with pytest.raises(InputError, match=r"no query images given"):
        plan_outputs([], tmp_path / "m.png")
    with pytest.raises(ConfigError, match=r"--out is needed"):
        plan_outputs([img(tmp_path / "q.jpg")], None)


# --- segment_queries ----------------------------------------------------------------------------------------------

class _FakeSession:
    def segment(self, x):  # (B, 3, S, S) -> (B, 1, S, S): foreground where the image is bright
        return (x.mean(1, keepdim=True) - 127.5) / 10


class _FakePipeline:
    class cfg:  # noqa: N801 - stands in for FSSAMConfig
        image_size = 16

    def __init__(self):
        self.batches = []

    def with_supports(self, supports, masks):
        session = _FakeSession()
        orig = session.segment
        session.segment = lambda x: (self.batches.append(x.shape[0]), orig(x))[1]
        return session


@pytest.mark.parametrize("batch", [0, -1, "abc"])
def test_batch_must_be_positive(tmp_path, batch):
    """Issue 16: `--batch -1` exited 0 with no mask written; `--batch 0` crashed."""
    s = load_supports([img(tmp_path / "s.png")], [img(tmp_path / "m.png")], 16)
    with pytest.raises(ConfigError, match=rf"--batch '?{batch}'?: (must be >= 1|not a whole number)"):
        list(segment_queries(_FakePipeline(), s, [img(tmp_path / "q.png")], batch=batch))


def test_plan_then_segment_writes_every_planned_file(tmp_path):
    from fssam_deploy.imageio import write_logits, write_mask

    qs = [img(tmp_path / "q" / "x.jpg", (10, 12)), img(tmp_path / "q" / "x.png"), img(tmp_path / "q" / "z.png")]
    s = load_supports([img(tmp_path / "s.png")], [img(tmp_path / "m.png")], 16)
    plan = plan_outputs(qs, tmp_path / "out", logits=tmp_path / "lg", inputs=[tmp_path / "s.png", tmp_path / "m.png"])
    pipe = _FakePipeline()
    for entry, res in zip(plan, segment_queries(pipe, s, [p.query for p in plan], batch=2)):
        assert res.path == entry.query
        write_mask(entry.mask, res.mask)
        write_logits(entry.logits, res.logits)
    assert pipe.batches == [2, 1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x_jpg.png", "x_png.png", "z.png"]
    assert np.load(tmp_path / "lg" / "x_jpg.npy").shape == (10, 12)
    assert torch.is_tensor(s.images)
