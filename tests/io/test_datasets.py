"""Every data source yields float32 images in [0, 1] of the right shape, and bad data fails
clearly."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from comdefend_tf.io import datasets as data
from tests.io.encoded import example as _example, png_bytes as _png_bytes


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


# ---------------------------------------------------------------------- tfrecord:GLOB


def _write_records(path, serialized):
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in serialized:
            writer.write(record)


@pytest.mark.parametrize("state_shape", [True, False])
def test_tfrecord_source_pixels_labels_and_split(tmp_path, state_shape):
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (6, 7), dtype=np.uint8) for _ in range(10)]
    records = [_example(_png_bytes(p), label=i % 4, shape=(6, 7, 1) if state_shape else None)
               for i, p in enumerate(pixels)]
    _write_records(tmp_path / "part-0.tfrecord", records[:6])
    _write_records(tmp_path / "part-1.tfrecord", records[6:])
    image_data = data.load_dataset(f"tfrecord:{tmp_path}/part-*.tfrecord", holdout_fraction=0.2)
    assert (image_data.num_train, image_data.num_test) == (8, 2)
    _check(image_data, (6, 7, 1), 4, count=8)
    images, labels = data.take_arrays(image_data.train.concatenate(image_data.test))
    got = sorted((int(label), np.round(image[..., 0] * 255).astype(np.uint8).tobytes())
                 for image, label in zip(images, labels))
    assert got == sorted((i % 4, p.tobytes()) for i, p in enumerate(pixels))
    again = data.load_dataset(f"tfrecord:{tmp_path}/part-*.tfrecord", holdout_fraction=0.2)
    first_test = data.take_arrays(image_data.test)[0]
    np.testing.assert_array_equal(data.take_arrays(again.test)[0], first_test)


def test_tfrecord_source_unlabelled_and_resized(tmp_path):
    rng = np.random.default_rng(1)
    records = [_example(_png_bytes(rng.integers(0, 256, size + (3,), dtype=np.uint8)))
               for size in [(5, 5), (9, 4), (5, 5)]]
    _write_records(tmp_path / "x.tfrecord", records)
    with pytest.raises(data.DataError, match="mixes image sizes"):
        data.load_dataset(f"tfrecord:{tmp_path}/x.tfrecord")
    image_data = data.load_dataset(f"tfrecord:{tmp_path}/x.tfrecord", image_size=(4, 4),
                                   color_mode="grayscale", holdout_fraction=0.34)
    _, labels = _check(image_data, (4, 4, 1), None, count=2)
    assert (labels == -1).all()


def test_bad_tfrecord_sources_fail_clearly(tmp_path):
    with pytest.raises(data.DataError, match="matches no file"):
        data.load_dataset(f"tfrecord:{tmp_path}/*.tfrecord")
    _write_records(tmp_path / "bad.tfrecord", [_example(b"not an image", label=0)])
    with pytest.raises(data.DataError, match="record 0 .*image/encoded"):
        data.load_dataset(f"tfrecord:{tmp_path}/bad.tfrecord")
    ok = _example(_png_bytes(np.zeros((4, 4), np.uint8)), label=1)
    _write_records(tmp_path / "half.tfrecord", [ok, _example(_png_bytes(np.zeros((4, 4),
                                                                          np.uint8)))])
    with pytest.raises(data.DataError, match="labels only 1 of 2"):
        data.load_dataset(f"tfrecord:{tmp_path}/half.tfrecord")


# ------------------------------------------------------- folders use the one lister and reader
def test_folder_refuses_links_out_of_the_class_folder_and_fifos(tmp_path):
    root = tmp_path / "data"
    _write_folder(root, [(4, 4)] * 4)
    outside = tmp_path / "secret.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(outside)
    os.symlink(outside, root / "class0" / "escape.png")
    with pytest.raises(data.DataError, match=r"escape\.png.*outside the input folder"):
        data.list_image_folder(str(root))
    os.remove(root / "class0" / "escape.png")
    os.mkfifo(root / "class1" / "pipe.png")
    with pytest.raises(data.DataError, match=r"pipe\.png.*not a regular file"):
        data.load_dataset(f"folder:{root}")
    os.remove(root / "class1" / "pipe.png")
    # A linked class folder is still one class: its files lie inside it.
    os.symlink(root / "class1", tmp_path / "linked")
    os.rename(tmp_path / "linked", root / "class2")
    files, labels, names = data.list_image_folder(str(root))
    assert names == ["class0", "class1", "class2"] and labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_folder_file_count_is_capped(tmp_path):
    _write_folder(tmp_path, [(4, 4)] * 5)
    assert len(data.list_image_folder(str(tmp_path), max_files=5)[0]) == 5
    with pytest.raises(data.DataError, match="more than 4 image files"):
        data.list_image_folder(str(tmp_path), max_files=4)


def test_folder_images_are_recognised_by_content_and_header(tmp_path):
    _write_folder(tmp_path, [(6, 6)] * 2)
    rgba = np.zeros((6, 6, 4), np.uint8)
    Image.fromarray(rgba).save(tmp_path / "class0" / "alpha.png")
    assert data.inspect_image_file(str(tmp_path / "class0" / "alpha.png")) == (6, 6, 4)
    with pytest.raises(data.DataError, match="alpha.png' has 4 channels"):
        data.load_dataset(f"folder:{tmp_path}")
    _check(data.load_dataset(f"folder:{tmp_path}", color_mode="rgb", holdout_fraction=0.34),
           (6, 6, 3), 2, count=2)
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "class1" / "x.png",
                                                        format="GIF")
    with pytest.raises(data.DataError, match=r"x\.png.*GIF data, not PNG or JPEG"):
        data.inspect_image_file(str(tmp_path / "class1" / "x.png"))
    with pytest.raises(data.DataError, match=r"alpha\.png' declares 6x6 = 36 pixels.*limit of 35"):
        data.inspect_image_file(str(tmp_path / "class0" / "alpha.png"), max_pixels=35)
