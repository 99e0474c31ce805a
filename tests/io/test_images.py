"""Image file I/O: decoding by content, [0, 1] scaling, rounding on write, and the hostile
cases (decompression bombs, foreign formats, FIFOs, planted links)."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from comdefend_tf.io import graph_headers
from comdefend_tf.io import images as image_io
from tests.io.encoded import bomb_png, raw_png, save


def _tf_reference(data: bytes, channels: int) -> np.ndarray:
    """The serving rule: ``tf.io.decode_png(data, dtype=tf.uint16) / 65535``."""
    decoded = tf.io.decode_png(data, channels=channels, dtype=tf.uint16)
    return tf.cast(decoded, tf.float32).numpy() / np.float32(65535)


def test_png_round_trip_is_exact(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    path = save(tmp_path / "a.png", pixels)
    image = image_io.read_image(path)
    assert image.dtype == np.float32 and image.shape == (7, 9, 3)
    np.testing.assert_array_equal(image, pixels.astype(np.float32) / np.float32(255))
    out = tmp_path / "b.png"
    image_io.write_png(str(out), image)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), pixels)


def test_write_rounds_to_nearest_grey_level(tmp_path):
    values = np.array([0.0, 0.49 / 255, 0.51 / 255, 100.4 / 255, 100.6 / 255, 1.2, -0.3],
                      np.float32).reshape(1, 7, 1)
    path = tmp_path / "g.png"
    image_io.write_png(str(path), values)
    np.testing.assert_array_equal(np.asarray(Image.open(path)).ravel(),
                                  [0, 0, 1, 100, 101, 255, 0])
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".partial")]


def test_write_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="height, width"):
        image_io.write_png(str(tmp_path / "x.png"), np.zeros((4, 4), np.float32))


def test_jpeg_named_png_is_decoded_by_content(tmp_path):
    pixels = np.full((16, 16, 3), (200, 30, 90), np.uint8)
    path = save(tmp_path / "photo.png", pixels, format="JPEG")  # like the authors' clean/
    image = image_io.read_image(path)
    assert image.shape == (16, 16, 3)
    assert np.abs(image * 255 - pixels).max() <= 3  # JPEG is lossy


def test_grey_and_colour_conversions(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    grey_path = save(tmp_path / "grey.png", grey)
    assert image_io.read_image(grey_path).shape == (3, 4, 1)
    as_rgb = image_io.read_image(grey_path, channels=3)
    assert as_rgb.shape == (3, 4, 3)
    np.testing.assert_array_equal(as_rgb[..., 0], as_rgb[..., 2])

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 10
    rgba_path = save(tmp_path / "rgba.png", rgba)
    np.testing.assert_array_equal(image_io.read_image(rgba_path)[0, 0], [1.0, 0.0, 0.0])
    luma = image_io.read_image(rgba_path, channels=1)
    assert luma.shape == (2, 2, 1)
    assert luma[0, 0, 0] * 255 == pytest.approx(0.299 * 255, abs=1)


def test_sixteen_bit_png_keeps_precision_and_matches_pillow_grey(tmp_path):
    values = np.array([[0, 1, 32768, 65535]], np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    image = image_io.read_image(str(path))
    assert image.shape == (1, 4, 1)
    np.testing.assert_allclose(image.ravel(), values.ravel() / 65535.0, rtol=0, atol=1e-7)


def test_unreadable_and_missing_files_are_named(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(image_io.ImageReadError, match="broken.png"):
        image_io.read_image(str(broken))
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    with pytest.raises(image_io.UnsupportedFormatError, match="notes.jpg"):
        image_io.read_image(str(text))
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for name, format in (("cut.png", "PNG"), ("cut.jpg", "JPEG")):
        whole = io.BytesIO()
        Image.fromarray(pixels).save(whole, format=format)
        (tmp_path / name).write_bytes(whole.getvalue()[:len(whole.getvalue()) // 2])
        with pytest.raises(image_io.ImageReadError, match=f"{name}.*(corrupt|truncated)"):
            image_io.read_image(str(tmp_path / name))
    with pytest.raises(FileNotFoundError, match="absent.png"):
        image_io.read_image(str(tmp_path / "absent.png"))


def test_psnr_db():
    reference = np.zeros((4, 4, 1), np.float32)
    noisy = reference + 0.1
    assert image_io.psnr_db(reference, noisy) == pytest.approx(20.0, abs=1e-4)
    assert image_io.psnr_db(reference, reference) == float("inf")
    with pytest.raises(ValueError, match="shapes differ"):
        image_io.psnr_db(reference, np.zeros((4, 4, 3)))


# ------------------------------------------------------------------ sizes before any work

def test_69_byte_png_declaring_20000_squared_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png())
    assert path.stat().st_size == 69

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image that was over the pixel limit")

    monkeypatch.setattr(tf.io, "decode_png", no_decoding)
    with pytest.raises(image_io.ImageTooLargeError,
                       match=r"bomb\.png.*20000x20000 = 400,000,000 pixels.*100,000,000"):
        image_io.read_image(str(path))


def test_jpeg_declaring_a_huge_size_is_refused_from_its_header(tmp_path):
    data = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data, format="JPEG")
    data = bytearray(data.getvalue())
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    data[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    path = tmp_path / "huge.jpg"
    path.write_bytes(bytes(data))
    with pytest.raises(image_io.ImageTooLargeError, match=r"huge\.jpg.*60000x60000"):
        image_io.read_image(str(path))


def test_pixel_limit_is_inclusive(tmp_path):
    path = save(tmp_path / "a.png", np.zeros((6, 7, 3), np.uint8))
    assert image_io.read_image(path, max_pixels=42).shape == (6, 7, 3)
    with pytest.raises(image_io.ImageTooLargeError, match="42 pixels.*limit of 41"):
        image_io.read_image(path, max_pixels=41)


def test_files_over_the_byte_cap_are_refused_before_reading(tmp_path, monkeypatch):
    path = save(tmp_path / "a.png", np.zeros((6, 7, 3), np.uint8))
    size = os.path.getsize(path)
    assert image_io.read_image(path, max_bytes=size).shape == (6, 7, 3)
    reads = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    with pytest.raises(image_io.ImageTooLargeError, match=f"{size:,} bytes.*limit of {size - 1}"):
        image_io.read_image(path, max_bytes=size - 1)
    assert reads == []


def test_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(image_io.ImageReadError, match="pipe.png.*not a regular file"):
        image_io.read_image(str(fifo))


# ------------------------------------------------------------------------------ formats

@pytest.mark.parametrize("format, label", [("EPS", "EPS"), ("GIF", "GIF"), ("TIFF", "TIFF"),
                                           ("BMP", "BMP"), ("WEBP", "WebP")])
def test_other_formats_named_png_are_refused_unopened(tmp_path, monkeypatch, format, label):
    path = tmp_path / "x.png"
    if format == "EPS":  # minimal EPS: Ghostscript would render it where installed
        path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
                         b"0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")
    else:
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path, format=format)

    def no_pillow(*args, **kwargs):
        raise AssertionError("Pillow opened a file")

    monkeypatch.setattr(Image, "open", no_pillow)
    with pytest.raises(image_io.UnsupportedFormatError, match=f"x.png.*{label}.*not PNG or JPEG"):
        image_io.read_image(str(path))


def test_cmyk_jpeg_is_refused_by_name(tmp_path):
    path = tmp_path / "print.jpg"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).convert("CMYK").save(path, format="JPEG")
    with pytest.raises(image_io.ImageReadError, match="print.jpg.*4 colour components"):
        image_io.read_image(str(path))


# -------------------------------------------------------- one rule with the serving path

@pytest.mark.parametrize("colour_type, samples, bit_depth", [
    (0, 1, 16), (4, 2, 16), (2, 3, 16), (6, 4, 16),   # 16-bit grey, grey+alpha, RGB, RGBA
    (0, 1, 8), (4, 2, 8), (2, 3, 8), (6, 4, 8)])       # the same in 8 bits
@pytest.mark.parametrize("channels", [None, 1, 3])
def test_png_values_equal_tf_decode_png_uint16_over_65535(tmp_path, colour_type, samples,
                                                          bit_depth, channels):
    high = 65536 if bit_depth == 16 else 256
    values = np.random.default_rng(colour_type).integers(0, high, (5, 6, samples))
    values[0, :4, 0] = [0, 1, high - 2, high - 1]  # the extremes and the finest step
    data = raw_png(values, colour_type, bit_depth)
    path = tmp_path / "deep.png"
    path.write_bytes(data)
    image = image_io.read_image(str(path), channels=channels)

    expected_channels = channels or (1 if colour_type in (0, 4) else 3)
    np.testing.assert_array_equal(image, _tf_reference(data, expected_channels))
    if colour_type in (0, 4):  # grey stays exact: the full 16 (or 8) bits, alpha dropped
        for channel in range(expected_channels):
            np.testing.assert_array_equal(image[..., channel] * np.float32(high - 1),
                                          values[..., 0].astype(np.float32))
    elif channels != 1:  # colour stays exact, alpha dropped
        np.testing.assert_array_equal(np.rint(image * (high - 1)), values[..., :3])
    if bit_depth == 16 and channels != 1:
        assert image[0, 1, 0] == np.float32(1) / np.float32(65535)  # not truncated to 8 bits


def test_eight_bit_values_are_exactly_value_over_255(tmp_path):
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = save(tmp_path / "ramp.png", values)
    image = image_io.read_image(path)
    np.testing.assert_array_equal(image[..., 0], values.astype(np.float32) / np.float32(255))


def test_palette_is_expanded_and_transparency_ignored(tmp_path):
    palette = Image.fromarray(np.array([[0, 1, 2]], np.uint8), mode="P")
    palette.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90])
    path = tmp_path / "palette.png"
    palette.save(path, transparency=1)
    image = image_io.read_image(str(path))
    np.testing.assert_array_equal(np.rint(image * 255)[0],
                                  [[10, 20, 30], [40, 50, 60], [70, 80, 90]])
    np.testing.assert_array_equal(image, _tf_reference(path.read_bytes(), 3))


def test_fully_transparent_pixels_keep_their_stored_colour(tmp_path):
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (200, 100, 50, 0)
    rgba[0, 1] = (200, 100, 50, 255)
    image = image_io.read_image(save(tmp_path / "alpha.png", rgba))
    np.testing.assert_array_equal(image[0, 0], image[0, 1])
    np.testing.assert_array_equal(np.rint(image[0, 0] * 255), [200, 100, 50])


def test_jpeg_values_equal_the_serving_decoder(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (21, 17, 3), dtype=np.uint8)
    path = save(tmp_path / "photo.jpg", pixels, format="JPEG")
    data = open(path, "rb").read()
    expected = tf.io.decode_image(data, channels=3).numpy().astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(image_io.read_image(path), expected)


# -------------------------------------------------------------------- EXIF orientation

@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow_exif_transpose(tmp_path, orientation):
    pixels = np.random.default_rng(orientation).integers(0, 256, (4, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "phone.png"
    Image.fromarray(pixels).save(path, exif=exif)
    with Image.open(path) as opened:
        upright = np.asarray(ImageOps.exif_transpose(opened))
    image = image_io.read_image(str(path))
    assert image.shape == upright.shape
    np.testing.assert_array_equal(image, upright.astype(np.float32) / np.float32(255))


def test_phone_jpeg_rotated_90_comes_out_upright(tmp_path):
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :8] = 255  # a white band on the left of the stored image
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(pixels).save(path, format="JPEG", quality=95, exif=exif)
    image = image_io.read_image(str(path))
    assert image.shape == (32, 16, 3)
    assert image[:8].mean() > 0.9 and image[12:].mean() < 0.1  # the band is now on top
    with Image.open(path) as opened:
        upright = np.asarray(ImageOps.exif_transpose(opened)).astype(np.float32) / 255
    assert np.abs(image - upright).max() < 6 / 255  # Pillow's JPEG decoder differs slightly


# ------------------------------------------------------------------------------ writing

def test_write_replaces_a_planted_link_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    out = tmp_path / "out.png"
    os.symlink(victim, out)
    image_io.write_png(str(out), np.zeros((2, 2, 3), np.float32))
    assert victim.read_bytes() == b"precious"
    assert not out.is_symlink() and np.asarray(Image.open(out)).shape == (2, 2, 3)


def test_psnr_in_chunks_equals_the_direct_formula():
    rng = np.random.default_rng(3)
    reference = rng.random((700, 600, 3), dtype=np.float32)
    image = np.clip(reference + rng.normal(0, 0.05, reference.shape), 0, 1).astype(np.float32)
    mse = np.mean((reference.astype(np.float64) - image) ** 2)
    assert image_io.psnr_db(reference, image) == pytest.approx(10 * np.log10(1 / mse), rel=1e-12)


def test_the_command_and_the_serving_signatures_read_the_same_values(tmp_path):
    rng = np.random.default_rng(9)
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    palette = io.BytesIO()
    Image.fromarray(rng.integers(0, 3, (9, 7), dtype=np.uint8), mode="P").save(palette,
                                                                              format="PNG")
    files = {"rgb16.png": raw_png(rng.integers(0, 65536, (9, 7, 3)), 2, 16),
             "grey16.png": raw_png(rng.integers(0, 65536, (9, 7, 1)), 0, 16),
             "rgba8.png": raw_png(rng.integers(0, 256, (9, 7, 4)), 6, 8),
             "palette.png": palette.getvalue(), "photo.jpg": jpeg.getvalue()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        for channels in (1, 3):
            served = graph_headers.decode_image_bytes(tf.constant(data), channels).numpy()
            np.testing.assert_array_equal(
                image_io.read_image(str(tmp_path / name), channels=channels), served,
                err_msg=f"{name} with {channels} channel(s)")


def test_write_without_replace_keeps_what_is_there(tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(b"another run's output")
    with pytest.raises(FileExistsError):
        image_io.write_png(str(out), np.zeros((2, 2, 3), np.float32), replace=False)
    assert out.read_bytes() == b"another run's output"
    assert os.listdir(tmp_path) == ["out.png"]  # the temporary file is gone
    fresh = tmp_path / "fresh.png"
    image_io.write_png(str(fresh), np.zeros((2, 2, 3), np.float32), replace=False)
    assert np.asarray(Image.open(fresh)).shape == (2, 2, 3)


# ------------------------------------------------------------ decoding work per input byte

def test_hostile_payloads_are_refused_before_any_decoder_runs(tmp_path, monkeypatch):
    from tests.fixtures import hostile_files

    def no_decoding(*args, **kwargs):
        raise AssertionError("a decoder ran on a file the payload check must refuse")

    monkeypatch.setattr(tf.io, "decode_png", no_decoding)
    monkeypatch.setattr(tf.io, "decode_jpeg", no_decoding)
    hostile = [case for case in hostile_files.FILE_CASES if case.keywords is not None]
    assert len(hostile) >= 8
    for case in hostile:
        path = hostile_files.write_case(str(tmp_path), case)
        with pytest.raises(image_io.ImageReadError) as refused:
            image_io.read_image(path)
        message = str(refused.value)
        assert case.name in message
        assert all(word.lower() in message.lower() for word in case.keywords), message


@pytest.mark.parametrize("options", [
    {"quality": 75, "optimize": True}, {"quality": 95, "progressive": True, "optimize": True},
    {"quality": 90, "restart_marker_rows": 1}, {"quality": 90, "restart_marker_blocks": 3,
                                                 "subsampling": 0},
    {"quality": 75, "restart_marker_rows": 2, "progressive": True}])
@pytest.mark.parametrize("content", ["flat grey", "flat colour", "noise"])
def test_valid_jpegs_at_any_compression_pass_the_payload_check(tmp_path, options, content):
    rng = np.random.default_rng(4)
    pixels = {"flat grey": np.full((333, 517), 77, np.uint8),
              "flat colour": np.full((333, 517, 3), (250, 3, 128), np.uint8),
              "noise": rng.integers(0, 256, (333, 517, 3), dtype=np.uint8)}[content]
    path = str(tmp_path / "x.jpg")
    Image.fromarray(pixels).save(path, format="JPEG", **options)
    assert image_io.read_image(path).shape[:2] == (333, 517)


def test_png_inflate_bound_is_deflates_own_limit(tmp_path):
    # A flat 1-bit 4000x3000 PNG deflated at level 9: ~7,800 pixels per byte, read.
    row = b"\x00" + b"\x00" * 500
    data = raw_png_rows(4000, 3000, 1, 0, zlib.compress(row * 3000, 9))
    path = tmp_path / "flat.png"
    path.write_bytes(data)
    assert 4000 * 3000 / len(data) > 7000
    assert image_io.read_image(str(path)).shape == (3000, 4000, 1)
    # The same declaration with one IDAT byte fewer than 1 per 1,032 bytes of pixels: refused.
    needed = -(-3000 * 500 // 1032)
    short = raw_png_rows(4000, 3000, 1, 0, b"\x78" * (needed - 1))
    path.write_bytes(short)
    with pytest.raises(image_io.ImageReadError, match=f"{needed - 1:,} bytes of image data"):
        image_io.read_image(str(path))


def raw_png_rows(width, height, bit_depth, colour_type, idat: bytes) -> bytes:
    """A PNG with the given IHDR and ``idat`` as its only IDAT chunk."""
    from tests.io.encoded import chunk

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))
