"""TensorBoard pictures (comdefend_tf.training.summaries): the grid layout, what each picture
holds, that drawing them leaves the training noise alone, and the training binary's image
summaries."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from comdefend_tf.io import datasets as data
from comdefend_tf.training import summaries
from comdefend_tf.config import get_config
from comdefend_tf.io.images import to_uint8
from comdefend_tf.model import ComDefend
from tests.conftest import REPO_ROOT, subprocess_env


def _images(count, height, width, channels, seed=0):
    return np.random.default_rng(seed).random((count, height, width, channels), np.float32)


def test_tile_places_cells_between_separator_lines():
    cells = np.arange(2 * 3 * 2 * 4 * 1, dtype=np.float32).reshape(2, 3, 2, 4, 1) / 100
    picture = summaries.tile(cells, separator=1, value=0.5)
    assert picture.shape == (2 * 3 - 1, 3 * 5 - 1, 1)
    np.testing.assert_array_equal(picture[3:5, 10:14], cells[1, 2])  # row 1, column 2
    np.testing.assert_array_equal(picture[2, :], 0.5)  # the line between the rows
    np.testing.assert_array_equal(picture[:, 4], 0.5)  # the line between columns 0 and 1
    with pytest.raises(ValueError, match="rows, columns"):
        summaries.tile(cells[0])


def test_pictures_show_the_images_their_purification_and_noise_free_code_bits():
    config = get_config("tiny", input_channels=3, inference_noise_std=1.0)
    model = ComDefend(config, seed=3)
    images = _images(5, 6, 7, 3)
    state_before = np.array(model.code_noise.seed_generator.state.numpy())
    drawn = summaries.pictures(model, images)
    # Drawing never advances the noise generator: training noise is the same without it.
    np.testing.assert_array_equal(model.code_noise.seed_generator.state.numpy(), state_before)

    width = 5 * (7 + 1) - 1
    assert drawn[summaries.TAG_ORIGINALS].shape == (6, width, 3)
    assert drawn[summaries.TAG_PURIFIED].shape == (6, width, 3)
    assert drawn[summaries.TAG_CODE_BITS].shape == (config.code_channels * 7 - 1, width, 1)
    np.testing.assert_array_equal(drawn[summaries.TAG_ORIGINALS][:, 8:15], images[1])
    outputs = model.forward(images, training=False, noise=0.0)
    np.testing.assert_allclose(drawn[summaries.TAG_PURIFIED][:, 16:23],
                               np.asarray(outputs["purified"])[2], atol=1e-6)
    # Code channel 2 of image 3: row 2, column 3 of the bit grid.
    bits = (np.asarray(outputs["code_logits"]) > 0).astype(np.float32)
    np.testing.assert_array_equal(drawn[summaries.TAG_CODE_BITS][14:20, 24:31, 0],
                                  bits[3, :, :, 2])
    # The same weights always give the same pictures (no noise draw), though inference noise
    # is on.
    again = summaries.pictures(model, images)
    np.testing.assert_array_equal(again[summaries.TAG_PURIFIED], drawn[summaries.TAG_PURIFIED])


def test_held_out_examples_crop_mixed_sizes_to_one_grid():
    sizes = [(10, 12), (8, 14), (9, 9)]
    dataset = tf.data.Dataset.from_generator(
        lambda: ((np.full((h, w, 1), i / 10, np.float32), np.int64(i))
                 for i, (h, w) in enumerate(sizes)),
        output_signature=(tf.TensorSpec((None, None, 1), tf.float32),
                          tf.TensorSpec((), tf.int64)))
    examples = summaries.held_out_examples(dataset, count=8)
    assert examples.shape == (3, 8, 9, 1)
    np.testing.assert_array_equal(examples[2], np.float32(0.2))
    assert summaries.held_out_examples(dataset, count=2).shape == (2, 8, 12, 1)
    with pytest.raises(ValueError, match="no images"):
        summaries.held_out_examples(dataset.take(0))


def test_callback_refuses_images_outside_the_unit_range(tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        summaries.HeldOutImages(np.full((2, 4, 4, 1), 1.5, np.float32), str(tmp_path))
    with pytest.raises(ValueError, match="height, width"):
        summaries.HeldOutImages(np.zeros((4, 4, 1), np.float32), str(tmp_path))


def _image_summaries(log_dir):
    """``{(step, tag): uint8 picture}`` of every image summary in ``log_dir``'s events."""
    found = {}
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "images":
                    continue
                encoded = tf.make_ndarray(value.tensor)  # [width, height, png]
                picture = tf.io.decode_png(encoded[2]).numpy()
                assert (int(encoded[0]), int(encoded[1])) == (picture.shape[1],
                                                              picture.shape[0])
                found[(event.step, value.tag)] = picture
    return found


def test_training_binary_writes_the_pictures_every_epoch(tmp_path):
    model_dir = tmp_path / "model"
    result = subprocess.run(
        [sys.executable, "-m", "train.train_comdefend", "--dataset=digits", "--config=tiny",
         "--epochs=2", "--steps_per_epoch=1", "--batch_size=16", "--summary_images=4",
         "--collapse_margin_db=-1", f"--model_dir={model_dir}"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"tensorboard --logdir {model_dir / 'logs'}" in result.stdout

    found = _image_summaries(str(model_dir / "logs" / summaries.IMAGES_SUBDIR))
    assert set(found) == {(step, tag) for step in (0, 1) for tag in summaries.TAGS}
    width = 4 * (8 + 1) - 1  # four 8x8 digits side by side
    for step in (0, 1):
        assert found[(step, summaries.TAG_ORIGINALS)].shape == (8, width, 1)
        assert found[(step, summaries.TAG_PURIFIED)].shape == (8, width, 1)
        assert found[(step, summaries.TAG_CODE_BITS)].shape == (4 * 9 - 1, width, 1)
        assert set(np.unique(found[(step, summaries.TAG_CODE_BITS)])) <= {0, 128, 255}
    # The originals are the first held-out digits of the seeded split, the same every epoch.
    held_out = data.take_arrays(data.load_dataset("digits").test, 4)[0]
    for index in range(4):
        np.testing.assert_array_equal(
            found[(1, summaries.TAG_ORIGINALS)][:, index * 9:index * 9 + 8],
            to_uint8(held_out[index]))
    np.testing.assert_array_equal(found[(0, summaries.TAG_ORIGINALS)],
                                  found[(1, summaries.TAG_ORIGINALS)])
    # Purified pictures come from the model being trained: they change between epochs.
    assert not np.array_equal(found[(0, summaries.TAG_PURIFIED)],
                              found[(1, summaries.TAG_PURIFIED)])
