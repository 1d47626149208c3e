"""Property-based fuzz of the readers users feed files to: image, mask, checkpoint, manifest.

Each reader gets random bytes and valid files (PNG, JPEG, 16-bit PNG, BMP, TIFF, torch checkpoints, JSON
manifests) with bytes flipped, overwritten, inserted, deleted or cut off. Only two outcomes are allowed: a valid
result, or one of our typed errors (FSSAMError) with a one-line message. Any other exception fails the test.
Deterministic (derandomize=True, no example database), so CI sees the same examples every run.
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fssam_deploy.errors import FSSAMError
from fssam_deploy.imageio import read_image, read_mask
from fssam_deploy.manifest import Manifest
from fssam_deploy.model.checkpoint import read_checkpoint

EXAMPLES = {"image": 400, "mask": 400, "checkpoint": 300, "manifest": 400}
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAX_PIXELS = 1_000_000  # mutated headers claim big sizes: keep decoding cheap


def _image_bytes(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _image_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    mask = (rng.random((12, 10)) > 0.5).astype(np.uint8) * 255
    exif = Image.Exif()
    exif[0x0112] = 6
    return [_image_bytes(rgb, "PNG"), _image_bytes(rgb, "JPEG", quality=90, exif=exif),
            _image_bytes((rng.random((8, 8)) * 65535).astype(np.uint16), "PNG"), _image_bytes(rgb, "BMP"),
            _image_bytes(rgb, "TIFF"), _image_bytes(mask, "PNG"), _image_bytes(mask, "GIF")]


def _checkpoint_seeds() -> list[bytes]:
    seeds = []
    obj = {"epoch": 0, "state_dict": {"sam2.w": torch.arange(6.0).reshape(2, 3), "dino.b": torch.ones(2).long()}}
    for zipped in (True, False):
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=zipped)
        seeds.append(buf.getvalue())
    return seeds


def _manifest_seeds() -> list[bytes]:
    good = {"format": "fssam-onnx/1", "config": {"sam2_config": "sam2_hiera_t", "image_size": 256}, "opset": 18,
            "stages": {"prior": {"file": "prior.onnx", "sha256": "0" * 64}}}
    return [json.dumps(good, indent=2).encode(), b"{}", b"[]", json.dumps(good).encode("utf-16")]


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[pos : pos + len(chunk)] = chunk
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        else:
            del data[pos:]
    return bytes(data)


def inputs(seeds: list[bytes]):
    return st.one_of(mutated(seeds), st.binary(max_size=600))


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _only_ours(read, path, data: bytes):
    """read(path) -> the result, or None when it raised one of our errors (one line); anything else propagates."""
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow / torch warn about odd files; warnings are allowed
        try:
            return read(path)
        except FSSAMError as exc:
            assert str(exc).startswith(str(path)) and "\n" not in str(exc), str(exc)
            return None


@settings(FUZZ, max_examples=EXAMPLES["image"])
@given(data=inputs(_image_seeds()))
def test_fuzz_read_image(fuzz_dir, data):
    img = _only_ours(lambda p: read_image(p, max_pixels=MAX_PIXELS), fuzz_dir / "image", data)
    if img is not None:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.size > 0


@settings(FUZZ, max_examples=EXAMPLES["mask"])
@given(data=inputs(_image_seeds()))
def test_fuzz_read_mask(fuzz_dir, data):
    mask = _only_ours(lambda p: read_mask(p, max_pixels=MAX_PIXELS), fuzz_dir / "mask", data)
    if mask is not None:
        assert mask.dtype == np.float32 and mask.ndim == 2 and set(np.unique(mask).tolist()) <= {0.0, 1.0}


@settings(FUZZ, max_examples=EXAMPLES["checkpoint"])
@given(data=inputs(_checkpoint_seeds()))
def test_fuzz_read_checkpoint(fuzz_dir, data):
    obj = _only_ours(read_checkpoint, fuzz_dir / "ckpt.pth", data)
    assert obj is None or isinstance(obj, dict)


@settings(FUZZ, max_examples=EXAMPLES["manifest"])
@given(data=inputs(_manifest_seeds()))
def test_fuzz_read_json_manifest(fuzz_dir, data):
    def read(p):
        return Manifest.read(p.parent, "fssam-onnx/1", "re-export with `fssam export`", filename=p.name).data

    manifest = _only_ours(read, fuzz_dir / "manifest.json", data)
    assert manifest is None or (isinstance(manifest, dict) and manifest["format"] == "fssam-onnx/1")


def test_random_bytes_checkpoint_is_one_short_line(tmp_path):
    """Issue 16: random bytes as a checkpoint printed eight lines of torch text (advising weights_only=False)."""
    (tmp_path / "rand.pth").write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(FSSAMError, match=r"rand\.pth: cannot read checkpoint \(UnpicklingError: [^\n]{1,200}\); it is "
                                         r"corrupt, truncated") as info:
        read_checkpoint(tmp_path / "rand.pth")
    assert "\n" not in str(info.value) and "weights_only` set to `False" not in str(info.value)
    assert len(str(info.value)) < 400
