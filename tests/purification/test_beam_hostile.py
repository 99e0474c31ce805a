"""The Beam pipeline against planted files and an export's own limits: every hostile input ends
as one named dead letter (or, for a plan that cannot be honoured, a refused request with
nothing written), the other inputs are purified and the manifest is written.

Each test is one small pipeline run on the FnApiRunner (in this process, or through the binary
for its exit status) over a few tiny images and one planted file from
``tests.fixtures.hostile_datasets``.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

beam = pytest.importorskip("apache_beam", reason="apache_beam is not installed (it is pinned "
                           "in requirements.txt; rebuild the venv with make venv)")

import tensorflow as tf  # noqa: E402

from comdefend_tf import load_comdefend  # noqa: E402
from comdefend_tf.io import examples as example_io  # noqa: E402
from comdefend_tf.io import images as image_io  # noqa: E402
from comdefend_tf.purification import handler, outputs, pipeline, refusals  # noqa: E402
from comdefend_tf.purification.files import purify_array  # noqa: E402
from comdefend_tf.purification.sources import DecodedImage  # noqa: E402
from tests.conftest import REPO_ROOT, subprocess_env  # noqa: E402
from tests.fixtures.purifiers import save_spread_tiny_purifier  # noqa: E402
from tests.fixtures import hostile_datasets as hostile  # noqa: E402

IN_PROCESS = ["--runner=FnApiRunner", "--direct_num_workers=1"]
EXPORT_MAX_PIXELS = 1000  # three 16x16 images per request; a 40x40 one is over


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_spread_tiny_purifier(tmp_path_factory.mktemp("tiny_grey_model"))


@pytest.fixture(scope="module")
def model(model_dir):
    return load_comdefend(model_dir)


@pytest.fixture(scope="module")
def small_export(tmp_path_factory, model):
    """An export of the tiny model whose budget is EXPORT_MAX_PIXELS pixels per request."""
    from comdefend_tf.serving import export as serving_export
    from comdefend_tf.serving.settings import ExportSettings

    return serving_export.export_savedmodel(
        model, str(tmp_path_factory.mktemp("export")),
        settings=ExportSettings(inference_noise_std=0.0, max_pixels=EXPORT_MAX_PIXELS))


def _run(tmp_path, input_spec, **settings):
    output_dir = str(tmp_path / "out")
    manifest = pipeline.run_purify_pipeline(pipeline.PurifyOptions(
        input=input_spec, output_dir=output_dir, **settings), IN_PROCESS)
    return manifest, output_dir


def _dead_letters(output_dir):
    return {entry["key"]: entry for entry in outputs.read_dead_letter(output_dir)}


def _examples(output_dir):
    records = tf.data.TFRecordDataset(sorted(glob.glob(os.path.join(output_dir, "purified-*"))))
    found = {}
    for record in records.as_numpy_iterator():
        feature = tf.train.Example.FromString(record).features.feature
        found[feature[example_io.FEATURE_KEY].bytes_list.value[0].decode()] = \
            feature[example_io.FEATURE_ENCODED].bytes_list.value[0]
    return found


def _counts(manifest):
    return manifest["inputs"], manifest["purified"], manifest["refused"]


def _run_binary(*flags):
    return subprocess.run([sys.executable, "-m", "export.purify_dataset", *flags],
                          cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)


def _budget_folder(tmp_path):
    """Six 16x16 grey PNGs (one request of six is 1,536 pixels, over the export's 1,000) and
    one 40x40 (1,600 pixels: over the budget alone)."""
    root = tmp_path / "images"
    root.mkdir()
    pixels = {f"s{i}.png": hostile.plant_png(str(root / f"s{i}.png"), 16, 16, seed=i)
              for i in range(6)}
    hostile.plant_png(str(root / "big.png"), 40, 40, seed=9)
    return root, pixels


def _assert_purified_like_the_model(output_dir, pixels, model):
    stored = _examples(output_dir)
    assert sorted(stored) == sorted(pixels)
    for key, values in pixels.items():
        expected = image_io.to_uint8(purify_array(model, values / np.float32(255)))
        got = image_io.decode_image(stored[key], channels=1)
        # The export tiles in the graph and may round differently in the last float bit.
        assert np.abs(image_io.to_uint8(got).astype(int) - expected.astype(int)).max() <= 1


# ----------------------------------------------------------------- the export's own budget
def test_batches_fit_the_exports_budget_and_an_image_over_it_is_a_dead_letter(
        tmp_path, small_export, model):
    root, pixels = _budget_folder(tmp_path)
    manifest, output_dir = _run(tmp_path, str(root), saved_model_dir=small_export)
    assert _counts(manifest) == (7, 6, 1)
    assert manifest["refused_by_reason"][refusals.TOO_LARGE] == 1
    refused = _dead_letters(output_dir)
    assert list(refused) == ["big.png"] and refused["big.png"]["reason"] == refusals.TOO_LARGE
    assert "1,600 pixels" in refused["big.png"]["detail"]
    assert "max_pixels_per_request" in refused["big.png"]["detail"]
    _assert_purified_like_the_model(output_dir, pixels, model)
    assert os.path.isfile(os.path.join(output_dir, outputs.MANIFEST_FILENAME))


def test_what_the_export_refuses_is_a_dead_letter(tmp_path, small_export, model):
    """An export whose metadata claims more than its graph accepts: the six small images,
    refused together, are purified one at a time; the large one, refused alone, is a
    ``model_refused`` dead letter quoting the export's (short) message."""
    import shutil

    from comdefend_tf.serving.export import EXPORT_METADATA_FILENAME

    lying = str(tmp_path / "lying_export")
    shutil.copytree(small_export, lying)
    metadata_path = os.path.join(lying, EXPORT_METADATA_FILENAME)
    with open(metadata_path) as handle:
        metadata = json.load(handle)
    metadata["limits"]["max_pixels_per_request"] = 10 ** 9
    with open(metadata_path, "w") as handle:
        json.dump(metadata, handle)
    root, pixels = _budget_folder(tmp_path)
    manifest, output_dir = _run(tmp_path, str(root), saved_model_dir=lying)
    assert _counts(manifest) == (7, 6, 1)
    assert manifest["refused_by_reason"][refusals.MODEL_REFUSED] == 1
    entry = _dead_letters(output_dir)["big.png"]
    assert entry["reason"] == refusals.MODEL_REFUSED
    assert entry["detail"].startswith("the exported model refused it: [too many pixels: at "
                                      "most 1000 (batch x height x width) per request")
    assert "\\" not in entry["detail"] and "node" not in entry["detail"]
    _assert_purified_like_the_model(output_dir, pixels, model)


def test_requests_are_cut_to_the_limits():
    items = [DecodedImage(f"k{i}", 0, np.zeros((16, 16, 1), np.float32), 0) for i in range(7)]
    sizes = [len(request) for request in handler.split_to_requests(
        items, handler.ExportLimits(max_pixels=1000, max_images=2))]
    assert sizes == [2, 2, 2, 1]
    sizes = [len(request) for request in handler.split_to_requests(
        items, handler.ExportLimits(max_pixels=1000, max_images=64))]
    assert sizes == [3, 3, 1]
    # An image over the budget alone is sent alone (for the export to refuse it by name).
    assert [len(r) for r in handler.split_to_requests(
        items[:2], handler.ExportLimits(max_pixels=100, max_images=64))] == [1, 1]
    assert [len(r) for r in handler.split_to_requests(items, None)] == [7]
    with pytest.raises(handler.ModelLoadError, match="max_batch_size must be a positive"):
        handler.read_export_limits({"limits": {"max_pixels_per_request": 5,
                                               "max_batch_size": 0}})
    noisy = "Graph execution error:\n\nDetected at node x\n<stack traces unavailable>\n" + \
        "assertion failed: [no] " + "y" * 5000 + "\n\t [[{{node x}}]]"
    assert handler.refusal_message(noisy) == ("[no] " + "y" * 5000)[:handler.MAX_REFUSAL_CHARS]
    with pytest.raises(handler.ModelLoadError, match="no request limits"):
        handler.read_export_limits({"comdefend_config": {}})


# ---------------------------------------------------------------------------- planted files
def test_a_name_that_is_not_utf8_is_a_dead_letter(tmp_path, model_dir):
    root = tmp_path / "images"
    root.mkdir()
    good = {f"g{i}.png" for i in range(3)}
    for i, name in enumerate(sorted(good)):
        hostile.plant_png(str(root / name), seed=i)
    hostile.plant_non_utf8_name(str(root))
    manifest, output_dir = _run(tmp_path, str(root), model_dir=model_dir, write_pngs=True)
    assert _counts(manifest) == (4, 3, 1)
    refused = _dead_letters(output_dir)
    assert list(refused) == ["bad\\xff-name.png"]
    assert refused["bad\\xff-name.png"]["reason"] == refusals.UNSAFE_FILE
    assert "not valid UTF-8" in refused["bad\\xff-name.png"]["detail"]
    assert set(_examples(output_dir)) == good
    assert sorted(os.listdir(os.path.join(output_dir, outputs.PNG_SUBDIR))) == sorted(good)


def test_a_250_character_name_is_purified_under_write_pngs(tmp_path, model_dir):
    root = tmp_path / "images"
    root.mkdir()
    hostile.plant_png(str(root / "short.png"))
    name = hostile.plant_long_name(str(root), 250)
    manifest, output_dir = _run(tmp_path, str(root), model_dir=model_dir, write_pngs=True)
    assert _counts(manifest) == (2, 2, 0)
    assert sorted(os.listdir(os.path.join(output_dir, outputs.PNG_SUBDIR))) == sorted(
        [name, "short.png"])
    assert not [entry for entry in os.listdir(output_dir) if entry.startswith(".partial")]


def test_a_png_the_file_system_refuses_is_a_dead_letter_and_in_no_output(tmp_path, model_dir):
    """The output folder's path is so long that the 250-character name's PNG passes the
    system's path limit (ENAMETOOLONG) while every other output fits."""
    root = tmp_path / "images"
    root.mkdir()
    hostile.plant_png(str(root / "short.png"))
    name = hostile.plant_long_name(str(root), 250)
    output_dir = os.path.join(hostile.deep_folder(str(tmp_path), 3880), "out")
    assert len(os.path.join(output_dir, outputs.PNG_SUBDIR, name)) > 4096
    manifest = pipeline.run_purify_pipeline(pipeline.PurifyOptions(
        input=str(root), output_dir=output_dir, model_dir=model_dir, write_pngs=True),
        IN_PROCESS)
    assert _counts(manifest) == (2, 1, 1)
    assert manifest["refused_by_reason"][refusals.CANNOT_WRITE] == 1
    entry = _dead_letters(output_dir)[name]
    assert entry["reason"] == refusals.CANNOT_WRITE and "too long" in entry["detail"]
    assert set(_examples(output_dir)) == {"short.png"}  # not counted, not in the records
    assert os.listdir(os.path.join(output_dir, outputs.PNG_SUBDIR)) == ["short.png"]


def test_a_fifo_is_counted_as_refused(tmp_path, model_dir):
    root = tmp_path / "images"
    root.mkdir()
    hostile.plant_png(str(root / "a.png"))
    fifo = hostile.plant_fifo(str(root))
    manifest, output_dir = _run(tmp_path, str(root), model_dir=model_dir)
    assert _counts(manifest) == (2, 1, 1)
    assert manifest["refused_by_reason"][refusals.UNSAFE_FILE] == 1
    entry = _dead_letters(output_dir)[fifo]
    assert entry["reason"] == refusals.UNSAFE_FILE and "not a regular file" in entry["detail"]


def test_damaged_tfrecords_are_dead_letters_and_the_rest_is_read(tmp_path, model_dir):
    rng = np.random.default_rng(11)

    def images(prefix, count):
        return [(f"{prefix}{i}", rng.integers(0, 256, (8, 8, 1), dtype=np.uint8))
                for i in range(count)]

    folder = tmp_path / "records"
    folder.mkdir()
    hostile.write_records(str(folder / "a.tfrecord"), images("a", 2))
    data_damaged = hostile.write_records(str(folder / "b.tfrecord"), images("b", 3))
    hostile.damage_record_data(str(folder / "b.tfrecord"), data_damaged[1])
    truncated = hostile.write_records(str(folder / "c.tfrecord"), images("c", 3))
    hostile.truncate_inside_record(str(folder / "c.tfrecord"), truncated[2])
    header_damaged = hostile.write_records(str(folder / "d.tfrecord"), images("d", 2))
    hostile.damage_record_header(str(folder / "d.tfrecord"), header_damaged[0])
    hostile.write_records(str(folder / "e.tfrecord"), images("e", 1))
    huge = hostile.append_huge_record_header(str(folder / "e.tfrecord"))
    manifest, output_dir = _run(tmp_path, f"tfrecord:{folder}/*.tfrecord", model_dir=model_dir)
    assert set(_examples(output_dir)) == {"a0", "a1", "b0", "b2", "c0", "c1", "e0"}
    refused = _dead_letters(output_dir)
    assert {key: entry["reason"] for key, entry in refused.items()} == {
        f"b.tfrecord@byte {data_damaged[1]}": refusals.UNREADABLE,
        f"c.tfrecord@byte {truncated[2]}": refusals.UNREADABLE,
        "d.tfrecord@byte 0": refusals.UNREADABLE,
        f"e.tfrecord@byte {huge}": refusals.TOO_LARGE}
    assert "data checksum" in refused[f"b.tfrecord@byte {data_damaged[1]}"]["detail"]
    assert "truncated" in refused[f"c.tfrecord@byte {truncated[2]}"]["detail"]
    assert "header" in refused["d.tfrecord@byte 0"]["detail"]
    assert "1,099,511,627,776 bytes" in refused[f"e.tfrecord@byte {huge}"]["detail"]
    assert _counts(manifest) == (11, 7, 4)
    assert os.path.isfile(os.path.join(output_dir, outputs.MANIFEST_FILENAME))


# ------------------------------------------------------------------------ the output plan
def test_two_inputs_with_one_png_name_are_refused_before_any_work(tmp_path, model_dir):
    root = tmp_path / "images"
    root.mkdir()
    first, second = hostile.plant_same_stem(str(root))
    output_dir = str(tmp_path / "out")
    with pytest.raises(pipeline.PurifyPipelineError) as raised:
        pipeline.run_purify_pipeline(pipeline.PurifyOptions(
            input=str(root), output_dir=output_dir, model_dir=model_dir, write_pngs=True),
            IN_PROCESS)
    assert repr(first) in str(raised.value) and repr(second) in str(raised.value)
    assert "'same.png'" in str(raised.value) and "--write_pngs" in str(raised.value)
    assert not os.path.exists(output_dir)
    (tmp_path / "a_file").write_text("")
    for not_a_folder in (tmp_path / "a_file", tmp_path / "a_file" / "below"):
        with pytest.raises(pipeline.PurifyPipelineError, match="cannot create the output"):
            pipeline.run_purify_pipeline(pipeline.PurifyOptions(
                input=str(root), output_dir=str(not_a_folder), model_dir=model_dir),
                IN_PROCESS)
    # Without PNG files the two keys are distinct records: both are purified.
    manifest, output_dir = _run(tmp_path, str(root), model_dir=model_dir)
    assert _counts(manifest) == (2, 2, 0) and set(_examples(output_dir)) == {first, second}


def test_overwrite_removes_a_killed_runs_temporaries(tmp_path, model_dir):
    root = tmp_path / "images"
    root.mkdir()
    hostile.plant_png(str(root / "a.png"))
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    planted = hostile.plant_killed_run(str(output_dir))
    (output_dir / "notes.txt").write_text("not ours")
    with pytest.raises(pipeline.PurifyPipelineError, match="not empty"):
        _run(tmp_path, str(root), model_dir=model_dir)
    manifest, _ = _run(tmp_path, str(root), model_dir=model_dir, write_pngs=True,
                       overwrite=True)
    assert _counts(manifest) == (1, 1, 0)
    left = sorted(os.listdir(output_dir))
    assert not set(planted[:3]) & set(left), left
    assert left == sorted(["dead_letter-00000-of-00001.jsonl", "manifest.json", "notes.txt",
                           "pngs", "purified-00000-of-00001.tfrecord"])
    assert os.listdir(output_dir / "pngs") == ["a.png"]


# ------------------------------------------------------------------------ the binary's exit
def test_binary_exit_status_with_planted_files(tmp_path, model_dir):
    """2 (some refused) with a manifest when planted files sit among good ones; 1 (nothing
    written) for a plan whose PNG names collide."""
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        hostile.plant_png(str(root / f"g{i}.png"), seed=i)
    hostile.plant_non_utf8_name(str(root))
    long_name = hostile.plant_long_name(str(root))
    hostile.plant_fifo(str(root))
    output_dir = tmp_path / "out"
    completed = _run_binary(f"--model_dir={model_dir}", f"--input={root}",
                            f"--output_dir={output_dir}", "--write_pngs")
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "inputs 6, purified 4, refused 2 (2 unsafe_file)" in completed.stdout
    with open(output_dir / outputs.MANIFEST_FILENAME) as handle:
        assert json.load(handle)["purified"] == 4
    assert long_name in os.listdir(output_dir / outputs.PNG_SUBDIR)
    hostile.plant_same_stem(str(root))
    completed = _run_binary(f"--model_dir={model_dir}", f"--input={root}",
                            f"--output_dir={tmp_path / 'again'}", "--write_pngs")
    assert completed.returncode == 1, completed.stderr[-3000:]
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "'same.jpg'" in last and "'same.png'" in last
    assert not os.path.exists(tmp_path / "again")
