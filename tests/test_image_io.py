"""read_image: every kind of file a data set holds, checked pixel by pixel against values computed here."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from perceive_components.ops.io import read_image, read_png_text, write_image

EXACT = 1e-7  # float32 rounding of values in [0, 1]; far below one 16-bit level (1.5e-5)


def assert_pixels(path, expected_hwc: np.ndarray) -> None:
    """read_image(path) equals ``expected_hwc`` (float64, (H, W, 3), values in [0, 1])."""
    image = read_image(path)
    assert image.dtype == torch.float32 and image.shape == (3, *expected_hwc.shape[:2])
    assert np.abs(image.permute(1, 2, 0).double().numpy() - expected_hwc).max() < EXACT


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return rgb * alpha[..., None] + (1.0 - alpha[..., None])


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png16(path, values: np.ndarray, exif: bytes | None = None) -> None:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA by the channel count), written byte by byte: Pillow
    cannot write 16-bit colour. Rows cycle through the filters None, Sub and Up (Sub reaches back one
    whole pixel, so the decoder must know a pixel is 2·C bytes)."""
    height, width, channels = values.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = values.astype(">u2").reshape(height, -1).view(np.uint8).astype(np.int64)  # big-endian bytes
    step = 2 * channels
    stream = b""
    for y, row in enumerate(rows):
        kind = y % 3
        if kind == 1:
            row = row - np.concatenate([np.zeros(step, np.int64), row[:-step]])
        elif kind == 2:
            row = row - rows[y - 1]
        stream += bytes([kind]) + (row % 256).astype(np.uint8).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    extra = png_chunk(b"eXIf", exif) if exif is not None else b""
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + extra
                     + png_chunk(b"IDAT", zlib.compress(stream)) + png_chunk(b"IEND", b""))


def exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


# ----------------------------------------------------------------------------- 16-bit
def test_16_bit_grey_keeps_full_precision(tmp_path, rng):
    values = rng.integers(0, 65536, (5, 7)).astype(np.uint16)
    values[0, :2] = (65535, 1)  # the top level and the smallest step: 8-bit reading would give 1.0 / 0.0
    for suffix in (".png", ".tif"):
        Image.fromarray(values).save(tmp_path / f"grey16{suffix}")
        with Image.open(tmp_path / f"grey16{suffix}") as stored:
            assert stored.mode.startswith("I;16")
        assert_pixels(tmp_path / f"grey16{suffix}", np.repeat(values[..., None] / 65535.0, 3, axis=-1))


@pytest.mark.parametrize("channels", [3, 4, 2])
def test_16_bit_colour_and_grey_alpha_keep_full_precision(tmp_path, rng, channels):
    values = rng.integers(0, 65536, (6, 5, channels)).astype(np.uint16)
    write_png16(tmp_path / "wide.png", values)
    scaled = values / 65535.0
    if channels == 3:
        expected = scaled
    elif channels == 4:
        expected = over_white(scaled[..., :3], scaled[..., 3])
    else:
        expected = np.repeat(over_white(scaled[..., :1], scaled[..., 1]), 3, axis=-1)
    assert_pixels(tmp_path / "wide.png", expected)


# ----------------------------------------------------------------------------- 8-bit kinds
def test_grey_and_alpha_images(tmp_path, rng):
    grey = rng.integers(0, 256, (4, 6)).astype(np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    assert_pixels(tmp_path / "l.png", np.repeat(grey[..., None] / 255.0, 3, axis=-1))

    alpha = rng.integers(0, 256, (4, 6)).astype(np.uint8)
    alpha[0, 0] = 0  # fully transparent: white, whatever colour is stored
    Image.fromarray(np.stack([grey, alpha], -1), "LA").save(tmp_path / "la.png")
    assert_pixels(tmp_path / "la.png", np.repeat(over_white(grey[..., None] / 255.0, alpha / 255.0), 3, -1))

    rgb = rng.integers(0, 256, (4, 6, 3)).astype(np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), "RGBA").save(tmp_path / "rgba.png")
    expected = over_white(rgb / 255.0, alpha / 255.0)
    assert_pixels(tmp_path / "rgba.png", expected)
    assert np.allclose(expected[0, 0], 1.0)
    Image.fromarray(np.concatenate([rgb, np.full((4, 6, 1), 255, np.uint8)], -1), "RGBA").save(tmp_path / "o.png")
    assert_pixels(tmp_path / "o.png", rgb / 255.0)  # opaque alpha changes nothing

    Image.fromarray(grey > 127).save(tmp_path / "bilevel.png")  # mode "1"
    assert_pixels(tmp_path / "bilevel.png", np.repeat((grey > 127)[..., None].astype(np.float64), 3, axis=-1))


def test_palette_images_with_and_without_transparency(tmp_path):
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], dtype=np.uint8)
    indices = np.array([[0, 1, 2], [3, 1, 0]], dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.reshape(-1).tolist())
    image.save(tmp_path / "plain.png")
    assert_pixels(tmp_path / "plain.png", palette[indices] / 255.0)

    image.save(tmp_path / "index.png", transparency=1)  # one fully transparent entry
    alpha = np.where(indices == 1, 0.0, 1.0)
    assert_pixels(tmp_path / "index.png", over_white(palette[indices] / 255.0, alpha))

    entry_alpha = np.array([255, 128, 0, 64], dtype=np.uint8)  # tRNS with one alpha per palette entry
    image.save(tmp_path / "alphas.png", transparency=entry_alpha.tobytes())
    with Image.open(tmp_path / "alphas.png") as stored:
        assert stored.mode == "P"
    assert_pixels(tmp_path / "alphas.png", over_white(palette[indices] / 255.0, entry_alpha[indices] / 255.0))


def test_rgb_colour_key_transparency(tmp_path):
    rgb = np.array([[[1, 2, 3], [9, 9, 9]], [[4, 5, 6], [9, 9, 9]]], dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "key.png", transparency=(9, 9, 9))
    assert_pixels(tmp_path / "key.png", over_white(rgb / 255.0, np.array([[1.0, 0.0], [1.0, 0.0]])))


def test_cmyk_converts_to_rgb(tmp_path, rng):
    cmyk = rng.integers(0, 256, (3, 4, 4)).astype(np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tif")
    c, k = cmyk[..., :3] / 255.0, cmyk[..., 3:] / 255.0
    expected = np.round(255.0 * (1 - c) * (1 - k)) / 255.0  # subtractive, no ICC profile
    assert_pixels(tmp_path / "cmyk.tif", expected)


# ----------------------------------------------------------------------------- orientation
VIEWER = {  # EXIF orientation → what a viewer displays, as array operations on (H, W, C)
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),          # rotate 90° clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),           # rotate 90° counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(VIEWER))
def test_exif_orientation_is_applied_as_a_viewer_does(tmp_path, rng, orientation):
    rgb = rng.integers(0, 256, (3, 5, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png", exif=exif_orientation(orientation))
    assert_pixels(tmp_path / "photo.png", VIEWER[orientation](rgb / 255.0))
    wide = rng.integers(0, 65536, (3, 5, 3)).astype(np.uint16)  # the two-pass 16-bit decode turns both halves
    write_png16(tmp_path / "wide.png", wide, exif=exif_orientation(orientation))
    assert_pixels(tmp_path / "wide.png", VIEWER[orientation](wide / 65535.0))


# ----------------------------------------------------------------------------- errors and metadata
def test_unreadable_files_are_named(tmp_path, rng):
    (tmp_path / "text.png").write_text("not an image")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(rng.random((4, 4)).astype(np.float32), "F").save(tmp_path / "float.tif")
    for name, message in (("text.png", "cannot read image"), ("cut.png", "cannot read image"),
                          ("float.tif", "no fixed value range")):
        with pytest.raises(ValueError, match=message) as info:
            read_image(tmp_path / name)
        assert name in str(info.value)
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.png")


def test_png_text_round_trip(tmp_path):
    image = torch.rand(3, 5, 6)
    write_image(tmp_path / "a.png", image, text={"source": '{"model": "abc"}'})
    assert read_png_text(tmp_path / "a.png") == {"source": '{"model": "abc"}'}
    assert read_png_text(write_image(tmp_path / "b.png", image)) == {}
    with pytest.raises(ValueError, match="needs a .png"):
        write_image(tmp_path / "a.jpg", image, text={"source": "x"})
