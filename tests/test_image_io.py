"""Image file I/O: decoding by content, [0, 1] scaling, rounding on write, file listing."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from comdefend_tf import image_io


def _save(path, pixels, format=None, mode=None):
    Image.fromarray(pixels, mode=mode).save(path, format=format)
    return str(path)


def test_png_round_trip_is_exact(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    path = _save(tmp_path / "a.png", pixels)
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
    path = _save(tmp_path / "photo.png", pixels, format="JPEG")  # like the authors' clean/
    image = image_io.read_image(path)
    assert image.shape == (16, 16, 3)
    assert np.abs(image * 255 - pixels).max() <= 3  # JPEG is lossy


def test_grey_and_colour_conversions(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    grey_path = _save(tmp_path / "grey.png", grey)
    assert image_io.read_image(grey_path).shape == (3, 4, 1)
    as_rgb = image_io.read_image(grey_path, channels=3)
    assert as_rgb.shape == (3, 4, 3)
    np.testing.assert_array_equal(as_rgb[..., 0], as_rgb[..., 2])

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 10
    rgba_path = _save(tmp_path / "rgba.png", rgba)
    np.testing.assert_array_equal(image_io.read_image(rgba_path)[0, 0], [1.0, 0.0, 0.0])
    luma = image_io.read_image(rgba_path, channels=1)
    assert luma.shape == (2, 2, 1)
    assert luma[0, 0, 0] * 255 == pytest.approx(0.299 * 255, abs=1)


def test_sixteen_bit_png_keeps_precision(tmp_path):
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
    with pytest.raises(image_io.ImageReadError, match="notes.jpg"):
        image_io.read_image(str(text))
    with pytest.raises(FileNotFoundError, match="absent.png"):
        image_io.read_image(str(tmp_path / "absent.png"))


def test_list_images_file_folder_glob(tmp_path):
    pixels = np.zeros((2, 2, 3), np.uint8)
    for name in ("b.png", "a.JPG", "c.jpeg"):
        _save(tmp_path / name, pixels, format="PNG")
    (tmp_path / "readme.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    _save(tmp_path / "sub" / "d.png", pixels)

    folder = image_io.list_images(str(tmp_path))
    assert [os.path.basename(p) for p in folder] == ["a.JPG", "b.png", "c.jpeg"]
    assert image_io.list_images(str(tmp_path / "b.png")) == [str(tmp_path / "b.png")]
    assert len(image_io.list_images(str(tmp_path / "**" / "*.png"))) == 2
    with pytest.raises(FileNotFoundError, match="nothing"):
        image_io.list_images(str(tmp_path / "nothing*.png"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        image_io.list_images(str(tmp_path / "empty"))


def test_psnr_db():
    reference = np.zeros((4, 4, 1), np.float32)
    noisy = reference + 0.1
    assert image_io.psnr_db(reference, noisy) == pytest.approx(20.0, abs=1e-4)
    assert image_io.psnr_db(reference, reference) == float("inf")
    with pytest.raises(ValueError, match="shapes differ"):
        image_io.psnr_db(reference, np.zeros((4, 4, 3)))
