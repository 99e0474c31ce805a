"""The purify command: files in, purified PNGs out, and the safety rules around them.

Uses a tiny random ComDefend saved with ``save_comdefend``: the behaviour under test (file
handling, tiling, channel order, rounding, exit status) does not depend on trained weights.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from comdefend_tf import ComDefend, get_config, load_comdefend, save_comdefend
from comdefend_tf.io import images as image_io
from comdefend_tf.weights import parity
from comdefend_tf.purification import files as purify_files
from comdefend_tf.purification import plan
from comdefend_tf.patches import exact_tiling, receptive_field_radius, whole_image_pixel_budget

from tests.conftest import REPO_ROOT, subprocess_env  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_model")
    model = ComDefend(get_config("tiny"), seed=0)
    # Random weights give a near-constant output; spread the code logits so the tiny model
    # really depends on its input (and so rounding and tiling matter).
    last = model.encoder.get_layer("comcnn_conv3")
    kernel, bias = last.get_weights()
    last.set_weights([kernel * 20, bias])
    save_comdefend(model, str(folder), {"note": "tiny random model for tests"})
    return str(folder)


@pytest.fixture(scope="module")
def model(model_dir):
    return load_comdefend(model_dir)


@pytest.fixture()
def photos(tmp_path):
    """A folder with an RGB PNG, a JPEG and a grey PNG, and their uint8 pixels."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "photos"
    folder.mkdir()
    pixels = {"a.png": rng.integers(0, 256, (20, 27, 3), dtype=np.uint8),
              "b.jpg": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
              "c.png": rng.integers(0, 256, (9, 11), dtype=np.uint8)}
    for name, values in pixels.items():
        Image.fromarray(values).save(folder / name)
    return folder, pixels


def bomb_png() -> bytes:
    """69 bytes declaring 20000x20000 RGB pixels (1.2 GB decoded)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    assert len(data) == 69
    return data


def _run_cli(*flags):
    return subprocess.run([sys.executable, "-m", "export.purify_images", *flags],
                          cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)


# ------------------------------------------------------------------------- output planning
def test_plan_maps_names_to_png_in_output_dir(tmp_path, photos):
    folder, _ = photos
    inputs = plan.list_files(str(folder)).paths
    pairs = plan.plan_outputs(inputs, str(tmp_path / "out"))
    assert [os.path.basename(t) for _, t in pairs] == ["a.png", "b.png", "c.png"]


def test_plan_refuses_the_input_folder(photos):
    folder, _ = photos
    inputs = plan.list_files(str(folder)).paths
    with pytest.raises(plan.OutputPlanError, match="never written into an input"):
        plan.plan_outputs(inputs, str(folder))
    with pytest.raises(plan.OutputPlanError):
        plan.plan_outputs(inputs, str(folder) + "/./")


def test_plan_refuses_name_collisions(tmp_path):
    paths = [str(tmp_path / "x" / "cat.jpg"), str(tmp_path / "y" / "cat.png")]
    with pytest.raises(plan.OutputPlanError, match="both be written"):
        plan.plan_outputs(paths, str(tmp_path / "out"))


def test_plan_never_writes_over_an_input_through_a_link(tmp_path, photos):
    folder, _ = photos
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(folder / "a.png", out / "a.png")
    inputs = plan.list_files(str(folder)).paths
    with pytest.raises(plan.OutputPlanError, match="is an input file"):
        plan.plan_outputs(inputs, str(out), overwrite=True)


def test_plan_counts_a_dangling_link_as_an_existing_output(tmp_path, photos):
    folder, _ = photos
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(tmp_path / "nowhere", out / "c.png")
    with pytest.raises(plan.OutputPlanError, match="already exist"):
        plan.plan_outputs([str(folder / "c.png")], str(out))


def test_plan_refuses_existing_outputs_unless_overwrite(tmp_path, photos):
    folder, _ = photos
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.png").write_bytes(b"keep me")
    inputs = plan.list_files(str(folder)).paths
    with pytest.raises(plan.OutputPlanError, match="--overwrite"):
        plan.plan_outputs(inputs, str(out))
    assert len(plan.plan_outputs(inputs, str(out), overwrite=True)) == 3


# ------------------------------------------------------------------------------ purifying
def test_purify_array_whole_image_equals_the_model(model):
    image = np.random.default_rng(2).uniform(0, 1, (13, 17, 3)).astype(np.float32)
    purified = purify_files.purify_array(model, image)
    np.testing.assert_array_equal(purified, np.asarray(model(image[None]))[0])
    assert purified.shape == image.shape and purified.dtype == np.float32


def test_overlapping_patches_equal_the_whole_image(model):
    from comdefend_tf.patches import receptive_field_radius

    image = np.random.default_rng(3).uniform(0, 1, (30, 23, 3)).astype(np.float32)
    whole = purify_files.purify_array(model, image)
    tiled = purify_files.purify_array(model, image, patch_size=8,
                                       overlap=receptive_field_radius(model.config))
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-5)
    seams = purify_files.purify_array(model, image, patch_size=8, overlap=0)
    assert np.abs(seams - whole).max() > 1e-3  # without context the tiles differ


class _Recorder:
    """The model, recording the shape of every network call."""

    def __init__(self, model):
        self.model, self.config, self.calls = model, model.config, []

    def __call__(self, images, training=False):
        self.calls.append(tuple(images.shape))
        return self.model(images, training=training)


def test_whole_image_mode_tiles_exactly_above_the_pixel_budget(model):
    image = np.random.default_rng(7).uniform(0, 1, (70, 53, 3)).astype(np.float32)
    whole = purify_files.purify_array(model, image, tile_above_pixels=0)
    budget = 900  # 30x30 windows: 18-pixel tiles plus the tiny model's radius of 6 per side
    recorder = _Recorder(model)
    tiled = purify_files.purify_array(recorder, image, tile_above_pixels=budget)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-5)
    assert len(recorder.calls) > 1
    assert max(n * h * w for n, h, w, _ in recorder.calls) <= budget
    assert purify_files.automatic_tiling(model, 70, 53, budget) == exact_tiling(
        model.config, 70, 53, budget)

    recorder.calls.clear()  # at or below the budget: one whole-image call
    small = image[:30, :30]
    purify_files.purify_array(recorder, small, tile_above_pixels=budget)
    assert recorder.calls == [(1, 30, 30, 3)]
    assert purify_files.automatic_tiling(model, 30, 30, budget) is None
    assert purify_files.automatic_tiling(model, 300, 300, 0) is None


def test_default_budget_follows_the_model_widths():
    paper, tiny = get_config("paper"), get_config("tiny")
    assert whole_image_pixel_budget(paper) == 2 * 2**30 // (4 * (128 + 256) * 4)
    assert whole_image_pixel_budget(tiny) > 10 * whole_image_pixel_budget(paper)
    tiling = exact_tiling(paper, 4000, 6000, whole_image_pixel_budget(paper))  # a 24 MP photo
    assert tiling.overlap == receptive_field_radius(paper) == 18
    window = tiling.patch_size + 2 * tiling.overlap
    assert tiling.batch_size * window * window <= whole_image_pixel_budget(paper)
    with pytest.raises(ValueError, match="too small for exact tiles"):
        exact_tiling(paper, 100, 100, 50 * 50)


def test_bgr_order_reverses_channels_around_the_network(model):
    image = np.random.default_rng(4).uniform(0, 1, (8, 8, 3)).astype(np.float32)
    bgr = purify_files.purify_array(model, image, channel_order="bgr")
    expected = np.asarray(model(image[None, ..., ::-1].copy()))[0, ..., ::-1]
    np.testing.assert_array_equal(bgr, expected)
    assert np.abs(bgr - purify_files.purify_array(model, image)).max() > 1e-3


def test_bfloat16_model_purifies_close_to_float32(model):
    from comdefend_tf.training import precision

    bf16 = precision.convert_model(model, "bfloat16")
    image = np.random.default_rng(5).uniform(0, 1, (8, 8, 3)).astype(np.float32)
    low = purify_files.purify_array(bf16, image)
    assert low.dtype == np.float32 and low.shape == image.shape
    # bf16 keeps about 3 significant digits; bits near 0 may flip, so compare on average.
    assert np.abs(low - purify_files.purify_array(model, image)).mean() < 0.05


def test_purify_files_writes_rounded_pngs_and_reports_psnr(tmp_path, model, photos):
    folder, pixels = photos
    pairs = plan.plan_outputs(plan.list_files(str(folder)).paths, str(tmp_path / "o"))
    os.makedirs(tmp_path / "o")
    summary = purify_files.purify_files(model, pairs, progress=False)
    assert summary.failures == [] and len(summary.written) == 3

    written = np.asarray(Image.open(tmp_path / "o" / "a.png"))
    image = image_io.read_image(str(folder / "a.png"))
    expected = image_io.to_uint8(np.asarray(model(image[None]))[0])
    np.testing.assert_array_equal(written, expected)
    # Grey inputs meet a 3-channel model as three equal channels.
    assert np.asarray(Image.open(tmp_path / "o" / "c.png")).shape == (9, 11, 3)
    assert summary.psnr_db[0] == pytest.approx(
        image_io.psnr_db(image, expected.astype(np.float32) / 255))
    assert "purified 3 image(s)" in summary.line() and "dB" in summary.line()


def test_hostile_files_are_named_skipped_and_counted(tmp_path, model, photos):
    folder, _ = photos
    (folder / "bomb.png").write_bytes(bomb_png())
    (folder / "x.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "o"
    out.mkdir()
    pairs = plan.plan_outputs(plan.list_files(str(folder)).paths, str(out))
    messages = []
    summary = purify_files.purify_files(model, pairs, progress=False, on_error=messages.append,
                                        max_file_bytes=10_000)
    reasons = {os.path.basename(path): reason for path, reason in summary.failures}
    assert set(reasons) == {"bomb.png", "x.png", "broken.jpg"}
    assert "20000x20000" in reasons["bomb.png"]
    assert "EPS" in reasons["x.png"] and "not PNG or JPEG" in reasons["x.png"]
    assert "corrupt" in reasons["broken.jpg"]
    assert sorted(os.listdir(out)) == ["a.png", "b.png", "c.png"]
    assert len(messages) == 3 and "3 refused" in summary.line()
    assert summary.refusals()[0].startswith("refused ")


def test_purify_files_counts_automatic_tiling_and_applies_exif(tmp_path, model):
    pixels = np.random.default_rng(8).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 8  # stored sideways: rotate 90 anticlockwise to display
    source = tmp_path / "phone.png"
    Image.fromarray(pixels).save(source, exif=exif)
    summary = purify_files.purify_files(model, [(str(source), str(tmp_path / "out.png"))],
                                        progress=False, tile_above_pixels=400)
    assert summary.auto_tiled == 1 and "1 tiled automatically" in summary.line()
    written = np.asarray(Image.open(tmp_path / "out.png"))
    upright = np.rot90(pixels, 1).astype(np.float32) / 255
    assert written.shape == (24, 40, 3)
    np.testing.assert_array_equal(
        written, image_io.to_uint8(purify_files.purify_array(model, upright,
                                                             tile_above_pixels=0)))


def test_truncation_reproduces_the_release_conversion(tmp_path, model, photos):
    folder, _ = photos
    pairs = [(str(folder / "a.png"), str(tmp_path / "a.png"))]
    purify_files.purify_files(model, pairs, to_uint8=parity.truncate_to_uint8,
                               progress=False)
    image = image_io.read_image(str(folder / "a.png"))
    expected = parity.truncate_to_uint8(np.asarray(model(image[None]))[0])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), expected)


def test_noise_seed_makes_runs_repeatable(model_dir):
    image = np.random.default_rng(6).uniform(0, 1, (12, 12, 3)).astype(np.float32)
    runs = [purify_files.purify_array(load_comdefend(model_dir, inference_noise_std=3.0,
                                                      seed=seed), image)
            for seed in (7, 7, 8)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert np.abs(runs[0] - runs[2]).max() > 0


# ------------------------------------------------------------------------ the command line
def test_cli_writes_good_images_names_bad_ones_and_fails(tmp_path, model_dir, photos):
    folder, _ = photos
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "bomb.png").write_bytes(bomb_png())
    (folder / "x.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")
    out = tmp_path / "purified"

    result = _run_cli(f"--model_dir={model_dir}", f"--input={folder}", f"--output_dir={out}",
                      "--patch_size=8", "--overlap=2", "--precision=bfloat16", "--noprogress")

    assert result.returncode == 2, result.stderr
    refused = [line.strip() for line in result.stderr.splitlines() if "refused " in line]
    assert len(refused) == 3
    assert any("bomb.png" in line and "20000x20000" in line for line in refused)
    assert any("x.png" in line and "EPS" in line for line in refused)
    assert any("broken.png" in line and "corrupt" in line for line in refused)
    assert sorted(os.listdir(out)) == ["a.png", "b.png", "c.png"]
    assert "purified 3 image(s)" in result.stdout and "3 refused" in result.stdout
    assert sorted(os.listdir(folder)) == ["a.png", "b.jpg", "bomb.png", "broken.png", "c.png",
                                          "x.png"]

    # A second run must not replace the outputs.
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    again = _run_cli(f"--model_dir={model_dir}", f"--input={folder}/*.png",
                     f"--output_dir={out}", "--noprogress")
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    # Writing into the input folder is refused by the same plan check, reported the same way
    # (see test_plan_refuses_the_input_folder).
    # A tiling budget too small for exact tiles stops the run before anything is written.
    fresh = tmp_path / "fresh"
    small = _run_cli(f"--model_dir={model_dir}", f"--input={folder}", f"--output_dir={fresh}",
                     "--tile_above_pixels=100", "--noprogress")
    assert small.returncode == 1 and "too small for exact tiles" in small.stderr
    assert not fresh.exists()


# ------------------------------------------------------------------- a LiteRT (.tflite) model
@pytest.fixture(scope="module")
def tflite_path(tmp_path_factory, model):
    pytest.importorskip("ai_edge_litert", reason="the [litert] extra runs .tflite purifiers")
    from comdefend_tf.litert import convert

    path = tmp_path_factory.mktemp("litert") / "purifier.tflite"
    path.write_bytes(convert.convert(model, "float32", (16, 16), 0.0))
    return str(path)


def test_litert_purify_array_tiles_exactly_like_the_keras_model(tflite_path, model):
    from comdefend_tf.litert.runtime import LiteRTPurifier

    litert = LiteRTPurifier(tflite_path)
    assert purify_files.model_channels(litert) == 3 and purify_files.is_litert(litert)
    image = np.random.default_rng(9).uniform(0, 1, (20, 27, 3)).astype(np.float32)
    purified = purify_files.purify_array(litert, image)  # larger than 16x16: tiled
    np.testing.assert_allclose(purified, purify_files.purify_array(model, image), atol=1e-5)
    bgr = purify_files.purify_array(litert, image, channel_order="bgr")
    np.testing.assert_allclose(bgr, purify_files.purify_array(model, image, channel_order="bgr"),
                               atol=1e-5)


def test_litert_purify_files_writes_and_refuses_like_the_keras_model(tmp_path, tflite_path,
                                                                      model, photos):
    from comdefend_tf.litert.runtime import LiteRTPurifier

    folder, _ = photos
    (folder / "bomb.png").write_bytes(bomb_png())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    results = {}
    for name, purifier in (("keras", model), ("litert", LiteRTPurifier(tflite_path))):
        inputs = sorted(str(path) for path in folder.iterdir())
        pairs = plan.plan_outputs(inputs, str(tmp_path / name))
        os.makedirs(tmp_path / name)
        results[name] = purify_files.purify_files(purifier, pairs, progress=False)
    keras_run, litert_run = results["keras"], results["litert"]
    assert [os.path.basename(p) for p in litert_run.written] == [
        os.path.basename(p) for p in keras_run.written] == ["a.png", "b.png", "c.png"]
    assert [(os.path.basename(path), reason) for path, reason in litert_run.failures] == [
        (os.path.basename(path), reason) for path, reason in keras_run.failures]
    assert len(litert_run.failures) == 2
    for written in litert_run.written:
        litert_pixels = np.asarray(Image.open(written), np.int16)
        keras_pixels = np.asarray(Image.open(tmp_path / "keras" / os.path.basename(written)),
                                  np.int16)
        assert np.abs(litert_pixels - keras_pixels).max() <= 1  # rounding of 1e-6 differences


def test_litert_models_refuse_the_tiling_flags(tflite_path):
    from comdefend_tf.litert.runtime import LiteRTPurifier

    litert = LiteRTPurifier(tflite_path)
    purify_files.check_settings(litert)
    for kwargs, flag in (({"patch_size": 8}, "--patch_size"), ({"overlap": 2}, "--overlap"),
                         ({"tile_above_pixels": 1000}, "--tile_above_pixels")):
        with pytest.raises(ValueError, match=f"{flag} does not apply to a .tflite purifier"):
            purify_files.check_settings(litert, **kwargs)


def test_cli_purifies_with_a_tflite_model(tmp_path, tflite_path, photos):
    folder, _ = photos
    (folder / "bomb.png").write_bytes(bomb_png())
    out = tmp_path / "purified"
    result = _run_cli(f"--model_dir={tflite_path}", f"--input={folder}", f"--output_dir={out}",
                      "--noprogress")
    assert result.returncode == 2, result.stderr
    assert sorted(os.listdir(out)) == ["a.png", "b.png", "c.png"]
    assert any("bomb.png" in line and "20000x20000" in line
               for line in result.stderr.splitlines())
    fixed = _run_cli(f"--model_dir={tflite_path}", f"--input={folder}",
                     f"--output_dir={tmp_path / 'seeded'}", "--seed=3", "--noprogress")
    assert fixed.returncode == 1
    assert "error: --seed cannot apply to a .tflite purifier" in fixed.stderr
    assert not (tmp_path / "seeded").exists()
