"""Patch-wise purification: geometry, equality with whole-image purification, memory bound."""

import numpy as np
import pytest

from comdefend_tf.config import get_config
from comdefend_tf.model import ComDefend
from comdefend_tf.patches import (activation_bytes_per_pixel, axis_tiling, exact_tiling,
                                  purify_patchwise, receptive_field_radius,
                                  whole_image_pixel_budget, window_start)


@pytest.fixture(scope="module")
def model():
    return ComDefend(get_config("tiny"), seed=0)


def _images(shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def test_receptive_field_radius_counts_convolutions():
    assert receptive_field_radius(get_config("paper")) == 18
    assert receptive_field_radius(get_config("tiny")) == 6


@pytest.mark.parametrize("shape, patch", [((2, 45, 37, 3), 16), ((1, 20, 20, 3), 7),
                                          ((1, 9, 30, 3), 32)])
def test_overlap_of_the_receptive_field_equals_whole_image(model, shape, patch):
    images = _images(shape)
    whole = np.asarray(model(images))
    overlap = receptive_field_radius(model.config)
    tiled = np.asarray(purify_patchwise(model, images, patch, overlap, batch_size=3))
    assert tiled.shape == shape
    np.testing.assert_allclose(tiled, whole, atol=1e-6)


def test_without_overlap_interior_of_each_tile_matches_whole_image(model):
    images = _images((1, 64, 64, 3), seed=1)
    whole = np.asarray(model(images))
    tiled = np.asarray(purify_patchwise(model, images, 32, 0))
    radius = receptive_field_radius(model.config)
    # Pixels farther than the receptive field from every tile edge see the same context.
    interior = np.zeros((64, 64), bool)
    for start in (0, 32):
        interior[start + radius:start + 32 - radius, :] = True
    interior &= interior.T
    np.testing.assert_allclose(tiled[0][interior], whole[0][interior], atol=1e-6)
    assert np.abs(tiled - whole).max() > 1e-3  # seams exist: tiles are purified alone


def test_release_tiling_purifies_each_tile_alone(model):
    images = _images((1, 64, 96, 3), seed=2)
    tiled = np.asarray(purify_patchwise(model, images, 32, 0))
    tile = images[:, 32:64, 64:96]
    np.testing.assert_allclose(tiled[:, 32:64, 64:96], np.asarray(model(tile)), atol=1e-6)


def test_uneven_edges_are_covered_without_padding(model):
    images = _images((1, 40, 50, 3), seed=3)
    tiled = np.asarray(purify_patchwise(model, images, 32, 0))
    assert tiled.shape == images.shape
    # The last column of tiles is moved inward to end at the image edge.
    np.testing.assert_allclose(tiled[:, 32:40, 32:50],
                               np.asarray(model(images[:, 8:40, 18:50]))[:, 24:, 14:], atol=1e-6)


def test_memory_is_bounded_by_the_patch_batch(model):
    calls = []

    def recording_purifier(windows):
        calls.append(windows.shape)
        return model(windows)

    purify_patchwise(recording_purifier, _images((2, 64, 64, 3)), 16, 4, batch_size=5)
    assert sum(shape[0] for shape in calls) == 2 * 16
    assert max(shape[0] for shape in calls) <= 5
    assert all(tuple(shape[1:]) == (24, 24, 3) for shape in calls)  # 16 + 2 * 4 context


def test_bad_arguments_are_refused(model):
    with pytest.raises(ValueError, match="patch_size"):
        purify_patchwise(model, _images((1, 8, 8, 3)), 0)
    with pytest.raises(ValueError, match="overlap"):
        purify_patchwise(model, _images((1, 8, 8, 3)), 4, -1)
    with pytest.raises(ValueError, match=r"\[batch, height, width, channels\]"):
        purify_patchwise(model, _images((8, 8, 3)), 4)


def test_exact_tiling_fits_the_budget_and_equals_whole_image(model):
    images = _images((1, 9, 70, 3), seed=4)  # a thin strip: windows are clipped to 9 rows
    budget = 20 * 20
    tiling = exact_tiling(model.config, 9, 70, budget)
    window_w = tiling.patch_size + 2 * tiling.overlap
    assert tiling.overlap == receptive_field_radius(model.config)
    assert tiling.batch_size == budget // (9 * window_w) > 1  # more thin windows per call
    calls = []

    def recording_purifier(windows):
        calls.append(tuple(windows.shape))
        return model(windows)

    tiled = purify_patchwise(recording_purifier, images, tiling.patch_size, tiling.overlap,
                             tiling.batch_size)
    assert max(n * h * w for n, h, w, _ in calls) <= budget
    np.testing.assert_allclose(np.asarray(tiled), np.asarray(model(images)), atol=1e-6)


def test_activation_estimate_uses_the_widest_convolution():
    assert activation_bytes_per_pixel(get_config("paper")) == 4 * (128 + 256) * 4
    assert activation_bytes_per_pixel(get_config("tiny")) == 4 * (8 + 12) * 4
    assert whole_image_pixel_budget(get_config("paper"), 6144 * 1000) == 1000


@pytest.mark.parametrize("patch_size, overlap", [(1, 0), (3, 2), (8, 0), (8, 6), (50, 3)])
def test_one_axis_geometry_for_python_ints_and_graph_tensors(patch_size, overlap):
    """The served graph evaluates the same geometry on int32 tensors: identical windows, each
    inside the axis and holding the pixels its tile owns."""
    import tensorflow as tf

    for length in range(1, 41, 3):
        patch, window, count = axis_tiling(length, patch_size, overlap)
        starts = [window_start(index, length, patch, window, overlap) for index in range(count)]
        graph_patch, graph_window, graph_count = axis_tiling(
            tf.constant(length), patch_size, overlap, minimum=tf.minimum)
        graph_starts = window_start(tf.range(graph_count), tf.constant(length), graph_patch,
                                    graph_window, overlap, minimum=tf.minimum, maximum=tf.maximum)
        assert (int(graph_patch), int(graph_window), int(graph_count)) == (patch, window, count)
        assert graph_starts.numpy().tolist() == starts
        assert count * patch >= length > (count - 1) * patch
        for index, start in enumerate(starts):
            owned_end = min((index + 1) * patch, length)
            assert 0 <= start <= index * patch and owned_end <= start + window <= length
