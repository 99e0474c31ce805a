"""Every data source yields float32 images in [0, 1] of the right shape, and bad data fails
clearly."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from comdefend_tf import data


def _check(image_data, shape, num_classes, count=8):
    images, labels = data.take_arrays(image_data.train, count)
    assert images.shape == (count,) + shape
    assert images.dtype == np.float32 and labels.dtype == np.int64
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert tuple(image_data.image_shape) == shape
    assert image_data.num_classes == num_classes
    return images, labels


def test_embedded_mnist5k_is_the_default_digit_set():
    image_data = data.load_dataset("mnist5k")
    images, labels = _check(image_data, (28, 28, 1), 10)
    assert (image_data.num_train, image_data.num_test) == (4500, 500)
    assert set(labels) <= set(range(10)) and images.max() == 1.0


def test_embedded_digits_and_photos():
    digits = data.load_dataset("digits")
    _check(digits, (8, 8, 1), 10)
    assert digits.num_train + digits.num_test == 1797
    photos = data.load_dataset("photos32")
    _, labels = _check(photos, (32, 32, 3), None)
    assert (labels == -1).all() and photos.num_train > 1000


def test_split_is_fixed_and_seeded():
    first = data.take_arrays(data.load_dataset("digits").test)[0]
    again = data.take_arrays(data.load_dataset("digits").test)[0]
    other = data.take_arrays(data.load_dataset("digits", split_seed=1).test)[0]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_resize_and_color_conversion():
    image_data = data.load_dataset("photos32", image_size=(16, 20), color_mode="grayscale")
    _check(image_data, (16, 20, 1), None)
    rgb = data.load_dataset("digits", color_mode="rgb")
    images, _ = _check(rgb, (8, 8, 3), 10)
    np.testing.assert_allclose(images[..., 0], images[..., 2])


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)),
                                         ("cifar10", (32, 32, 3))])
def test_tfds_sources_with_mock_data(name, shape):
    with tfds.testing.mock_data(num_examples=12):
        image_data = data.load_dataset(name)
        _check(image_data, shape, 10)
        batch = next(iter(data.batched(image_data.test, 4, images_only=True)))
        assert tuple(batch.shape) == (4,) + shape


def test_imagenet_needs_an_image_size():
    with pytest.raises(data.DataError, match="image_size"):
        data.load_dataset("imagenet2012")


def _write_folder(root, sizes, mode="L"):
    for index, size in enumerate(sizes):
        class_dir = root / f"class{index % 2}"
        class_dir.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(index).integers(0, 256, size=size + (
            () if mode == "L" else (3,)), dtype=np.uint8)
        Image.fromarray(pixels, mode).save(class_dir / f"img{index}.png")


def test_folder_source(tmp_path):
    _write_folder(tmp_path, [(10, 12)] * 10)
    image_data = data.load_dataset(f"folder:{tmp_path}")
    assert image_data.num_train + image_data.num_test == 10
    _check(image_data, (10, 12, 1), 2)
    resized = data.load_dataset(f"folder:{tmp_path}", image_size=(6, 6), color_mode="rgb")
    _check(resized, (6, 6, 3), 2)


def test_folder_pixels_are_the_files_pixels_over_255(tmp_path):
    _write_folder(tmp_path, [(5, 5)] * 4)
    image_data = data.load_dataset(f"folder:{tmp_path}", holdout_fraction=0.25)
    files, _, _ = data.list_image_folder(str(tmp_path))
    expected = {np.asarray(Image.open(f)).tobytes() for f in files}
    images, _ = data.take_arrays(image_data.train.concatenate(image_data.test))
    got = {np.round(image[..., 0] * 255).astype(np.uint8).tobytes() for image in images}
    assert got == expected


def test_bad_folders_fail_clearly(tmp_path):
    with pytest.raises(data.DataError, match="not a directory"):
        data.load_dataset(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(data.DataError, match="no class subfolders"):
        data.load_dataset(f"folder:{tmp_path}")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(data.DataError, match="holds no"):
        data.load_dataset(f"folder:{tmp_path}")


def test_unreadable_file_is_named(tmp_path):
    _write_folder(tmp_path, [(8, 8)] * 3)
    corrupt = tmp_path / "class0" / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(data.DataError, match="broken.png"):
        data.load_dataset(f"folder:{tmp_path}")


def test_mixed_sizes_need_a_resize(tmp_path):
    _write_folder(tmp_path, [(8, 8), (8, 8), (9, 8)])
    with pytest.raises(data.DataError, match="mixes image sizes.*image_size"):
        data.load_dataset(f"folder:{tmp_path}")
    _check(data.load_dataset(f"folder:{tmp_path}", image_size=(8, 8), holdout_fraction=0.34),
           (8, 8, 1), 2, count=2)


def test_mixed_channels_need_a_color_mode(tmp_path):
    _write_folder(tmp_path, [(8, 8)] * 2)
    _write_folder(tmp_path / "x", [(8, 8)], mode="RGB")
    os.rename(tmp_path / "x" / "class0", tmp_path / "class2")
    with pytest.raises(data.DataError, match="mixes grayscale"):
        data.load_dataset(f"folder:{tmp_path}")


def test_unknown_source_lists_the_choices():
    with pytest.raises(data.DataError, match="mnist5k"):
        data.load_dataset("nonsense")
