"""Images and masks read as people see them: EXIF orientation, 16-bit scaled, pixel limit, soft masks, atomic writes."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from fssam_deploy.episode_files import load_supports
from fssam_deploy.errors import ConfigError, InputError
from fssam_deploy.imageio import (
    SoftMaskWarning,
    check_readable,
    list_images,
    max_pixels,
    read_image,
    read_mask,
    write_logits,
    write_mask,
    write_overlay,
)

ORIENTATION = 0x0112


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw_rows: bytes) -> bytes:
    """A PNG file from its IHDR fields and unfiltered rows (each row: filter byte 0 + pixels)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw_rows))
            + chunk(b"IEND", b""))


def save_with_orientation(path, arr: np.ndarray, orientation: int = 6) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(arr).save(path, exif=exif)


# --- EXIF orientation ---------------------------------------------------------------------------------------------

def test_exif_orientation_applied_to_images(tmp_path):
    stored = (np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3) * 10)  # (H=2, W=4) as stored
    save_with_orientation(tmp_path / "phone.png", stored, 6)  # 6: shown rotated 90 degrees clockwise
    shown = read_image(tmp_path / "phone.png")
    assert shown.shape == (4, 2, 3)
    np.testing.assert_array_equal(shown, np.rot90(stored, k=-1))


@pytest.mark.parametrize("orientation,expected", [(3, lambda a: np.rot90(a, 2)), (8, lambda a: np.rot90(a, 1)),
                                                   (2, lambda a: a[:, ::-1]), (1, lambda a: a)])
def test_exif_orientations_on_masks(tmp_path, orientation, expected):
    stored = np.zeros((2, 4), np.uint8)
    stored[0, 0] = 255
    save_with_orientation(tmp_path / "m.png", stored, orientation)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), expected(stored > 0).astype(np.float32))


def test_support_mask_drawn_on_displayed_photo_fits(tmp_path):
    """Issue 16: a phone photo shown as 240x320 and a mask drawn on it were refused as a size mismatch."""
    photo = np.full((24, 32, 3), 90, np.uint8)  # stored 32x24 (WxH), shown as 24x32
    save_with_orientation(tmp_path / "s.jpg", photo, 6)
    drawn = np.zeros((32, 24), np.uint8)  # drawn on the displayed image: 24 wide, 32 high
    drawn[4:20, 2:10] = 255
    Image.fromarray(drawn).save(tmp_path / "s.png")
    support = load_supports([tmp_path / "s.jpg"], [tmp_path / "s.png"], size=16)
    assert tuple(support.images.shape) == (1, 1, 3, 16, 16)
    assert support.masks.sum() > 0
    assert read_image(tmp_path / "s.jpg").shape == (32, 24, 3)


def test_mask_size_mismatch_still_refused(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "s.png")
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(InputError, match=r"m\.png: mask is 9x8 \(WxH\) but its support .*s\.png is 8x8"):
        load_supports([tmp_path / "s.png"], [tmp_path / "m.png"], size=16)


# --- 16-bit and float images --------------------------------------------------------------------------------------

def test_16bit_gray_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 257 * 200, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    img = read_image(tmp_path / "g16.png")
    assert img.dtype == np.uint8 and img.shape == (1, 4, 3)
    np.testing.assert_array_equal(img[0, :, 0], [0, 100, 200, 255])
    assert (img[..., 0] == img[..., 2]).all()


def test_16bit_rgb_png_is_scaled(tmp_path):
    px = np.array([[[40000, 1000, 65535]]], np.uint16)  # one pixel
    (tmp_path / "rgb16.png").write_bytes(png_bytes(1, 1, 16, 2, b"\x00" + px.astype(">u2").tobytes()))
    np.testing.assert_allclose(read_image(tmp_path / "rgb16.png")[0, 0], np.array([40000, 1000, 65535]) / 257, atol=1)


def test_32bit_int_and_float_images_are_scaled(tmp_path):
    Image.fromarray(np.array([[0, 32768, 65535]], np.int32), mode="I").save(tmp_path / "i.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "i.tif")[0, :, 0], [0, 128, 255])
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), mode="F").save(tmp_path / "f.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif")[0, :, 0], [0, 128, 255])


def test_rgba_gray_and_palette_images(tmp_path):
    Image.fromarray(np.full((3, 3, 4), 200, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((3, 3), 7, np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.full((3, 3), 7, np.uint8)).convert("P").save(tmp_path / "p.png")
    for name in ("a.png", "g.png", "p.png"):
        img = read_image(tmp_path / name)
        assert img.shape == (3, 3, 3) and img.dtype == np.uint8


# --- pixel limit --------------------------------------------------------------------------------------------------

def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(InputError, match=r"big\.png: image of 100x100 \(0\.0 MPixel\) is over the limit of 0\.005 "
                                         r"MPixel; downscale it, or raise the limit with FSSAM_MAX_PIXELS"):
        read_image(tmp_path / "big.png", max_pixels=5000)
    monkeypatch.setenv("FSSAM_MAX_PIXELS", "9999")
    with pytest.raises(InputError, match=r"big\.png: mask of 100x100 .* over the limit"):
        read_mask(tmp_path / "big.png")
    with pytest.raises(InputError, match="over the limit"):
        check_readable([tmp_path / "big.png"], decode=False)
    monkeypatch.setenv("FSSAM_MAX_PIXELS", "10000")
    assert read_image(tmp_path / "big.png").shape == (100, 100, 3)


def test_decompression_bomb_headers_are_refused(tmp_path):
    """Headers claiming huge sizes with almost no data: ours refuses 144 MPixel (Pillow only warns there, and that
    warning is not shown), Pillow's hard limit refuses 900 MPixel; both are one InputError line."""
    (tmp_path / "big.png").write_bytes(png_bytes(12000, 12000, 1, 0, b"\x00"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError, match=r"big\.png: image of 12000x12000 \(144\.0 MPixel\) is over the limit "
                                             r"of 100 MPixel"):
            read_image(tmp_path / "big.png")
    (tmp_path / "bomb.png").write_bytes(png_bytes(30000, 30000, 1, 0, b"\x00"))
    with pytest.raises(InputError, match=r"bomb\.png: mask is over Pillow's hard limit of 179 MPixel "
                                         r"\(DecompressionBombError: Image size \(900000000 pixels\)"):
        read_mask(tmp_path / "bomb.png", max_pixels=10**12)


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5"])
def test_bad_pixel_limit_setting(monkeypatch, value):
    monkeypatch.setenv("FSSAM_MAX_PIXELS", value)
    with pytest.raises(ConfigError, match=rf"FSSAM_MAX_PIXELS='{value}': expected a positive whole number"):
        max_pixels()


def test_pixel_limit_default_and_underscores(monkeypatch):
    monkeypatch.delenv("FSSAM_MAX_PIXELS", raising=False)
    assert max_pixels() == 100_000_000
    monkeypatch.setenv("FSSAM_MAX_PIXELS", "200_000_000")
    assert max_pixels() == 200_000_000


# --- masks --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [[0, 1], [0, 255], [0, 37], [0], [255]])
def test_binary_masks_unchanged_without_warning(tmp_path, values):
    arr = np.array([values * 4], np.uint8)
    Image.fromarray(arr).save(tmp_path / "m.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), (arr > 0).astype(np.float32))


def test_label_mask_with_ignore_value(tmp_path):
    """{0, 1, 255}: the reference's label form, 255 = ignore (background), 1 = object."""
    Image.fromarray(np.array([[0, 1, 255, 1]], np.uint8)).save(tmp_path / "m.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), [[0, 1, 0, 1]])


def test_bilevel_mask(tmp_path):
    Image.fromarray(np.array([[0, 255, 255]], np.uint8)).convert("1").save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), [[0, 1, 1]])


def test_soft_8bit_mask_thresholded_at_half_with_warning(tmp_path):
    Image.fromarray(np.array([[0, 64, 127, 128, 200, 255]], np.uint8)).save(tmp_path / "soft.png")
    with pytest.warns(SoftMaskWarning, match=r"soft\.png: soft mask \(6 distinct values in 0\.\.255\) thresholded "
                                             r"at >= 128 \(half of 255\): 50\.0% foreground"):
        m = read_mask(tmp_path / "soft.png")
    np.testing.assert_array_equal(m, [[0, 0, 0, 1, 1, 1]])


def test_soft_16bit_mask_thresholded_at_half_its_range(tmp_path):
    Image.fromarray(np.array([[0, 1000, 32767, 32768, 65535]], np.uint16)).save(tmp_path / "soft16.png")
    with pytest.warns(SoftMaskWarning, match=r"soft16\.png: .*thresholded at >= 32768 \(half of 65535\)"):
        m = read_mask(tmp_path / "soft16.png")
    np.testing.assert_array_equal(m, [[0, 0, 0, 1, 1]])


def test_16bit_binary_mask(tmp_path):
    Image.fromarray(np.array([[0, 65535, 0]], np.uint16)).save(tmp_path / "b16.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(read_mask(tmp_path / "b16.png"), [[0, 1, 0]])


def test_colour_mask_refused_gray_rgb_accepted(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    with pytest.raises(InputError, match=r"c\.png: a mask must have one channel .* this one has colours"):
        read_mask(tmp_path / "c.png")
    Image.fromarray(np.repeat(np.array([[0, 255]], np.uint8)[..., None], 3, axis=2)).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "g.png"), [[0, 1]])


def test_gray_alpha_mask_uses_its_gray_channel(tmp_path):
    Image.fromarray(np.array([[[0, 255], [255, 9]]], np.uint8), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "la.png"), [[0, 1]])


# --- unreadable files ---------------------------------------------------------------------------------------------

def test_unreadable_files_one_line_each(tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 9).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "dir.png").mkdir()
    check_readable([tmp_path / "trunc.png"], decode=False)  # the header is intact
    cases = {"trunc.png": r"trunc\.png: cannot read image \(OSError: .*\); is it a complete",
             "text.jpg": r"text\.jpg: cannot read image \(UnidentifiedImageError",
             "dir.png": r"dir\.png: is a folder, not an image file",
             "missing.png": r"missing\.png: image file not found"}
    for name, match in cases.items():
        with pytest.raises(InputError, match=match) as info:
            check_readable([tmp_path / "ok.png", tmp_path / name])
        assert "\n" not in str(info.value)
    with pytest.raises(InputError, match=r"trunc\.png: cannot read mask"):
        read_mask(tmp_path / "trunc.png")


def test_list_images_skips_hidden_and_non_images(tmp_path):
    for name in ("b.png", "a.jpg", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images([str(tmp_path)])] == ["a.jpg", "b.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: folder holds no images"):
        list_images([str(tmp_path / "empty")])


# --- writing ------------------------------------------------------------------------------------------------------

def test_writes_are_atomic_and_leave_no_temp_files(tmp_path):
    mask = np.array([[0, 1], [1, 0]], bool)
    write_mask(tmp_path / "out" / "m.png", mask)
    write_logits(tmp_path / "out" / "l.npy", np.ones((2, 2)))
    write_overlay(tmp_path / "out" / "o.jpg", np.zeros((2, 2, 3), np.uint8), mask)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["l.npy", "m.png", "o.jpg"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "m.png")), mask * 255)
    assert np.load(tmp_path / "out" / "l.npy").dtype == np.float32


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "m.png"
    target.write_bytes(b"previous")

    def boom(self, fp, *a, **k):
        fp.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        write_mask(target, np.ones((2, 2)))
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]


def test_write_errors_name_the_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"file/m\.png: cannot write \(.*\); check that its folder is writable"):
        write_mask(tmp_path / "file" / "m.png", np.ones((2, 2)))
    with pytest.raises(ConfigError, match=r"m\.xyz: unknown image extension '\.xyz'; use \.png"):
        write_mask(tmp_path / "m.xyz", np.ones((2, 2)))
