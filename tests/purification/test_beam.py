"""Purifying a dataset on Apache Beam: every input purified or dead-lettered, byte-identical to
the purify command at noise 0, counted, refused on rerun, and readable by training.

Runs only where ``apache_beam`` imports (pinned in ``requirements.txt``). One pipeline run through
the binary on the FnApiRunner in multi-process mode (2 workers) over 60 real digits plus three
bad files is shared by most tests; the others run small in-process pipelines.
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
from PIL import Image  # noqa: E402

from comdefend_tf import load_comdefend  # noqa: E402
from comdefend_tf.io import datasets as data  # noqa: E402
from comdefend_tf.io import examples as example_io  # noqa: E402
from comdefend_tf.io import images as image_io  # noqa: E402
from comdefend_tf.purification import (handler, outputs, pipeline, plan,  # noqa: E402
                                       refusals, sources)
from comdefend_tf.purification.files import purify_array, purify_files  # noqa: E402

from tests.conftest import REPO_ROOT, subprocess_env  # noqa: E402
from tests.fixtures.purifiers import save_spread_tiny_purifier  # noqa: E402

IN_PROCESS = ["--runner=FnApiRunner", "--direct_num_workers=1"]
MAX_PIXELS = 40_000  # the oversized test image has 300x300 = 90,000


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_spread_tiny_purifier(tmp_path_factory.mktemp("tiny_gray_model"))


@pytest.fixture(scope="module")
def model(model_dir):
    return load_comdefend(model_dir)


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """60 real MNIST digits (6 per class) in class subfolders, plus a corrupt PNG, an RGB
    image (the model is grey) and a 300x300 image (over MAX_PIXELS)."""
    images, labels, _ = data._mnist5k()
    root = tmp_path_factory.mktemp("digits")
    for index in [500 * digit + j for digit in range(10) for j in range(6)]:
        folder = root / str(labels[index])
        folder.mkdir(exist_ok=True)
        Image.fromarray(image_io.to_uint8(images[index])[..., 0]).save(
            folder / f"d{index:04d}.png")
    (root / "0" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    Image.fromarray(np.full((28, 28, 3), 90, np.uint8)).save(root / "2" / "rgb.png")
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(root / "1" / "big.png")
    return str(root)


def _run_binary(*flags):
    return subprocess.run([sys.executable, "-m", "export.purify_dataset", *flags],
                          cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def multiprocess_run(tmp_path_factory, model_dir, digit_folder):
    output_dir = str(tmp_path_factory.mktemp("purified") / "out")
    completed = _run_binary(f"--model_dir={model_dir}", f"--input={digit_folder}",
                            f"--output_dir={output_dir}", f"--max_pixels={MAX_PIXELS}",
                            "--write_pngs", "--code_bits", "--batch_size=16",
                            "--direct_running_mode=multi_processing", "--direct_num_workers=2")
    return completed, output_dir


def _examples(output_dir):
    records = tf.data.TFRecordDataset(sorted(glob.glob(os.path.join(output_dir, "purified-*"))))
    return {tf.train.Example.FromString(r).features.feature[example_io.FEATURE_KEY]
            .bytes_list.value[0].decode(): r for r in records.as_numpy_iterator()}


def _feature(serialized, name):
    feature = tf.train.Example.FromString(serialized).features.feature[name]
    return feature.bytes_list.value[0] if feature.bytes_list.value else \
        feature.int64_list.value[0]


def _good_files(digit_folder):
    return sorted(glob.glob(os.path.join(digit_folder, "*", "d*.png")))


# ---------------------------------------------------------------------- the multi-process run
def test_every_input_is_purified_or_dead_lettered(multiprocess_run, digit_folder):
    completed, output_dir = multiprocess_run
    # 2 (exit_codes.SOME_REFUSED): finished, some inputs refused.
    assert completed.returncode == 2, completed.stderr[-3000:]
    examples = _examples(output_dir)
    good_keys = {os.path.relpath(p, digit_folder) for p in _good_files(digit_folder)}
    assert set(examples) == good_keys and len(good_keys) == 60
    refusals = {entry["key"]: entry["reason"]
                for entry in outputs.read_dead_letter(output_dir)}
    assert refusals == {os.path.join("0", "corrupt.png"): "unreadable",
                        os.path.join("1", "big.png"): "too_large",
                        os.path.join("2", "rgb.png"): "wrong_channels"}


def test_manifest_counts_match_the_outputs(multiprocess_run, digit_folder):
    completed, output_dir = multiprocess_run
    with open(os.path.join(output_dir, outputs.MANIFEST_FILENAME)) as handle:
        manifest = json.load(handle)
    assert (manifest["inputs"], manifest["purified"], manifest["refused"]) == (63, 60, 3)
    assert manifest["refused_by_reason"] == {"unreadable": 1, "too_large": 1,
                                             "wrong_channels": 1, "unsafe_file": 0,
                                             "model_refused": 0, "cannot_write": 0}
    all_files = glob.glob(os.path.join(digit_folder, "*", "*.png"))
    assert manifest["input_bytes"] == sum(os.path.getsize(p) for p in all_files)
    examples = _examples(output_dir)
    assert manifest["output_bytes"] == sum(len(_feature(e, example_io.FEATURE_ENCODED))
                                           for e in examples.values())
    assert manifest["class_names"] == [str(d) for d in range(10)]
    assert manifest["runner"] == "FnApiRunner" and manifest["seconds"] > 0
    assert "inputs 63, purified 60, refused 3" in completed.stdout


def test_outputs_equal_the_purify_command_bytes(multiprocess_run, digit_folder, model,
                                               tmp_path):
    _, output_dir = multiprocess_run
    files = _good_files(digit_folder)
    pairs = plan.plan_outputs(files, str(tmp_path / "command"))
    os.makedirs(tmp_path / "command")
    # Identical files would also hide a do-nothing purifier: the outputs must differ from
    # the inputs.
    summary = purify_files(model, pairs, progress=False)
    assert not summary.failures
    examples = _examples(output_dir)
    changed = 0
    for source, target in pairs:
        key = os.path.relpath(source, digit_folder)
        with open(target, "rb") as handle:
            expected = handle.read()
        assert _feature(examples[key], example_io.FEATURE_ENCODED) == expected, key
        with open(outputs.png_path(os.path.join(output_dir, outputs.PNG_SUBDIR), key),
                  "rb") as handle:
            assert handle.read() == expected, key
        assert _feature(examples[key], example_io.FEATURE_LABEL) == int(key.split(os.sep)[0])
        with open(source, "rb") as handle:
            changed += handle.read() != expected
    assert changed == 60


def test_code_bits_are_the_models(multiprocess_run, digit_folder, model):
    _, output_dir = multiprocess_run
    key = sorted(_examples(output_dir))[7]
    stored = example_io.unpack_code_bits(_examples(output_dir)[key])
    image = image_io.read_image(os.path.join(digit_folder, key))
    expected = model.code_bits(image[None]).numpy()[0].astype(np.uint8)
    assert stored.shape == (28, 28, 4) and 0 < stored.mean() < 1
    np.testing.assert_array_equal(stored, expected)


def test_rerun_is_refused_without_overwrite(multiprocess_run, model_dir, digit_folder):
    _, output_dir = multiprocess_run
    before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(output_dir, "*"))}
    options = pipeline.PurifyOptions(input=digit_folder, output_dir=output_dir,
                                     model_dir=model_dir)
    with pytest.raises(pipeline.PurifyPipelineError, match="--overwrite"):
        pipeline.run_purify_pipeline(options, IN_PROCESS)
    after = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(output_dir, "*"))}
    assert after == before


def test_training_reads_the_output_through_tfrecord_glob(multiprocess_run, tmp_path):
    _, output_dir = multiprocess_run
    source = "tfrecord:" + os.path.join(output_dir, "purified-*.tfrecord")
    image_data = data.load_dataset(source)
    assert image_data.image_shape == (28, 28, 1) and image_data.num_classes == 10
    assert (image_data.num_train, image_data.num_test) == (54, 6)
    completed = subprocess.run(
        [sys.executable, "-m", "train.train_classifier", f"--dataset={source}",
         f"--model_dir={tmp_path / 'classifier'}", "--epochs=1", "--batch_size=18"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "on 6 images" in completed.stdout
    assert os.path.isfile(tmp_path / "classifier" / "classifier.keras")


# ------------------------------------------------------------------ in-process pipelines
def _write_records(path, items):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for key, pixels, label in items:
            buffer = image_io.encode_png(pixels)
            feature = {
                "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[buffer])),
                "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(
                    value=[label])),
                example_io.FEATURE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[key.encode()]))}
            writer.write(tf.train.Example(features=tf.train.Features(
                feature=feature)).SerializeToString())


def test_tfrecord_input_of_different_sizes(tmp_path, model_dir, model):
    rng = np.random.default_rng(3)
    sizes = [(28, 28), (17, 23), (28, 28), (9, 40), (17, 23)]
    items = [(f"img{i}", rng.integers(0, 256, size + (1,), dtype=np.uint8), i % 3)
             for i, size in enumerate(sizes)]
    _write_records(tmp_path / "a.tfrecord", items[:3])
    _write_records(tmp_path / "b.tfrecord", items[3:])
    output_dir = str(tmp_path / "out")
    # 28x28 = 784 pixels are over the tiling budget (exact tiles, as the purify command cuts
    # them); 17x23 and 9x40 are purified whole.
    options = pipeline.PurifyOptions(input=f"tfrecord:{tmp_path}/*.tfrecord",
                                     output_dir=output_dir, model_dir=model_dir,
                                     batch_size=2, tile_above_pixels=500,
                                     include_code_bits=True)
    manifest = pipeline.run_purify_pipeline(options, IN_PROCESS)
    assert (manifest["inputs"], manifest["purified"], manifest["refused"]) == (5, 5, 0)
    examples = _examples(output_dir)
    assert sorted(examples) == [key for key, _, _ in items]
    for key, pixels, label in items:
        image = pixels.astype(np.float32) / 255
        expected = image_io.to_uint8(purify_array(model, image, tile_above_pixels=500))
        stored = examples[key]
        assert _feature(stored, example_io.FEATURE_ENCODED) == image_io.encode_png(expected)
        np.testing.assert_array_equal(example_io.unpack_code_bits(stored),
                                      model.code_bits(image[None]).numpy()[0])
        assert _feature(stored, example_io.FEATURE_LABEL) == label
        assert (_feature(stored, example_io.FEATURE_HEIGHT),
                _feature(stored, example_io.FEATURE_WIDTH)) == pixels.shape[:2]


def test_overwrite_replaces_a_previous_run(tmp_path, model_dir):
    rng = np.random.default_rng(4)
    _write_records(tmp_path / "in.tfrecord",
                   [(f"k{i}", rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), 0)
                    for i in range(3)])
    output_dir = str(tmp_path / "out")
    options = pipeline.PurifyOptions(input=f"tfrecord:{tmp_path}/in.tfrecord",
                                     output_dir=output_dir, model_dir=model_dir,
                                     num_shards=3)
    pipeline.run_purify_pipeline(options, IN_PROCESS)
    assert len(glob.glob(os.path.join(output_dir, "purified-*"))) == 3
    rerun = pipeline.PurifyOptions(input=f"tfrecord:{tmp_path}/in.tfrecord",
                                   output_dir=output_dir, model_dir=model_dir,
                                   num_shards=1, overwrite=True)
    manifest = pipeline.run_purify_pipeline(rerun, IN_PROCESS)
    assert manifest["outputs"]["tfrecords"] == ["purified-00000-of-00001.tfrecord"]
    assert sorted(os.listdir(output_dir)) == ["dead_letter-00000-of-00001.jsonl",
                                             "manifest.json", "purified-00000-of-00001.tfrecord"]
    assert len(_examples(output_dir)) == 3


def test_bad_requests_fail_before_anything_is_written(tmp_path, model_dir, digit_folder):
    output_dir = str(tmp_path / "out")
    with pytest.raises(pipeline.PurifyPipelineError, match="exactly one"):
        pipeline.PurifyOptions(input=digit_folder, output_dir=output_dir)
    with pytest.raises(pipeline.PurifyPipelineError, match="matches"):
        pipeline.run_purify_pipeline(pipeline.PurifyOptions(
            input=str(tmp_path / "nothing" / "*.png"), output_dir=output_dir,
            model_dir=model_dir), IN_PROCESS)
    with pytest.raises(pipeline.PurifyPipelineError, match="not a model directory"):
        pipeline.run_purify_pipeline(pipeline.PurifyOptions(
            input=digit_folder, output_dir=output_dir, model_dir=str(tmp_path)), IN_PROCESS)
    with pytest.raises(pipeline.PurifyPipelineError, match="--batch_szie=3"):
        pipeline.run_purify_pipeline(pipeline.PurifyOptions(
            input=digit_folder, output_dir=output_dir, model_dir=model_dir),
            IN_PROCESS + ["--batch_szie=3", "--flink_master=host:8081"])
    assert not os.path.exists(output_dir)
    assert pipeline.unknown_pipeline_flags(
        ["--direct_num_workers=2", "--project", "p", "--no_use_public_ips", "stray",
         "--save_main_session", "--bogus"]) == ["stray", "--bogus"]


def test_links_outside_and_loops_are_dead_lettered_not_purified(tmp_path, model_dir, model):
    """The listing's refusals, the purify command's: a link to a PNG outside the input folder,
    a link to itself, and (under **) a folder link back to the input folder."""
    rng = np.random.default_rng(7)
    outside = tmp_path / "secret"
    outside.mkdir()
    Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(
        outside / "secret.png")
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    pixels = {}
    for name in ("x.png", "y.png"):
        pixels[os.path.join("a", name)] = rng.integers(0, 256, (12, 12), dtype=np.uint8)
        Image.fromarray(pixels[os.path.join("a", name)]).save(root / "a" / name)
    os.symlink(outside / "secret.png", root / "a" / "leak.png")
    os.symlink("loop.png", root / "a" / "loop.png")
    os.symlink(root, root / "a" / "again")
    output_dir = str(tmp_path / "out")
    manifest = pipeline.run_purify_pipeline(pipeline.PurifyOptions(
        input=os.path.join(str(root), "**", "*.png"), output_dir=output_dir,
        model_dir=model_dir), IN_PROCESS)
    assert (manifest["inputs"], manifest["purified"], manifest["refused"]) == (4, 2, 2)
    assert manifest["refused_by_reason"][refusals.UNSAFE_FILE] == 2
    refused = {entry["key"]: entry for entry in outputs.read_dead_letter(output_dir)}
    assert sorted(refused) == [os.path.join("a", "leak.png"), os.path.join("a", "loop.png")]
    assert {entry["reason"] for entry in refused.values()} == {refusals.UNSAFE_FILE}
    assert "outside the input folder" in refused[os.path.join("a", "leak.png")]["detail"]
    stored = _examples(output_dir)
    assert sorted(stored) == sorted(pixels)
    for key, values in pixels.items():
        expected = image_io.to_uint8(purify_array(model, values[..., None] / np.float32(255)))
        assert _feature(stored[key], example_io.FEATURE_ENCODED) == image_io.encode_png(expected)
    assert manifest["input_bytes"] == sum(os.path.getsize(root / key) for key in pixels)


def test_max_files_refuses_the_request_before_anything_is_written(tmp_path, model_dir,
                                                                  digit_folder):
    output_dir = str(tmp_path / "out")
    with pytest.raises(pipeline.PurifyPipelineError, match="more than 62 files"):
        pipeline.run_purify_pipeline(pipeline.PurifyOptions(
            input=digit_folder, output_dir=output_dir, model_dir=model_dir, max_files=62),
            IN_PROCESS)
    with pytest.raises(pipeline.PurifyPipelineError, match="max_files must be >= 1"):
        pipeline.PurifyOptions(input=digit_folder, output_dir=output_dir, model_dir=model_dir,
                               max_files=0)
    assert not os.path.exists(output_dir)


def test_binary_exits_1_on_a_bad_request(tmp_path, model_dir):
    completed = _run_binary(f"--model_dir={model_dir}", f"--input={tmp_path / 'none'}/*.png",
                            f"--output_dir={tmp_path / 'out'}")
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert completed.stderr.strip().splitlines()[-1].startswith("error: no ")
    assert not os.path.exists(tmp_path / "out")


def test_glob_input_takes_labels_from_the_first_folder(digit_folder):
    input_plan = plan.plan_inputs(os.path.join(digit_folder, "[37]", "d*.png"))
    assert input_plan.class_names == ("3", "7")
    assert {label for _, _, label in input_plan.files} == {0, 1} and len(input_plan.files) == 12
    assert all(key.startswith(("3" + os.sep, "7" + os.sep)) for key, _, _ in input_plan.files)


def test_saved_model_handler_matches_the_keras_model(tmp_path, model):
    from comdefend_tf.serving import export as serving_export
    from comdefend_tf.serving.settings import ExportSettings

    version = serving_export.export_savedmodel(
        model, str(tmp_path / "export"), settings=ExportSettings(inference_noise_std=0.0))
    rng = np.random.default_rng(5)
    batch = [sources.DecodedImage(f"k{i}", 0, rng.random((19, 26, 1), np.float32), 0)
             for i in range(3)]
    saved = handler.PurifierModelHandler(saved_model_dir=version)
    results = list(saved.run_inference(batch, saved.load_model()))
    for item, result in zip(batch, results):
        expected = purify_array(model, item.image)
        # The export tiles in the graph (whole image here) and may round differently in the
        # last float bit; the uint8 pixels agree to one grey level.
        np.testing.assert_allclose(result.inference["purified"], expected, atol=1e-5)
        np.testing.assert_array_equal(result.inference["code_bits"],
                                      model.code_bits(item.image[None]).numpy()[0])
    mixed = batch[:1] + [sources.DecodedImage("odd", 0, np.zeros((5, 5, 1), np.float32), 0)]
    with pytest.raises(ValueError, match="one shape"):
        saved.run_inference(mixed, saved.load_model())


def test_tfds_input_reads_a_prepared_dataset(tmp_path, model_dir, model):
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(6)
    pixels = rng.integers(0, 256, (4, 10, 10, 1), dtype=np.uint8)
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(10, 10, 1)),
        "label": tfds.features.ClassLabel(names=["left", "right"])})
    tfds.dataset_builders.store_as_tfds_dataset(
        name="purify_dataset_test_set", version="1.0.0", features=features,
        split_datasets={"train": tf.data.Dataset.from_tensor_slices(
            {"image": pixels, "label": np.array([0, 1, 1, 0])})},
        data_dir=str(tmp_path / "tfds"))
    output_dir = str(tmp_path / "out")
    manifest = pipeline.run_purify_pipeline(pipeline.PurifyOptions(
        input="tfds:purify_dataset_test_set", data_dir=str(tmp_path / "tfds"),
        output_dir=output_dir, model_dir=model_dir), IN_PROCESS)
    assert (manifest["inputs"], manifest["purified"]) == (4, 4)
    assert manifest["class_names"] == ["left", "right"]
    stored = sorted((_feature(e, example_io.FEATURE_LABEL),
                     _feature(e, example_io.FEATURE_ENCODED))
                    for e in _examples(output_dir).values())
    expected = sorted((label, image_io.encode_png(image_io.to_uint8(
        purify_array(model, p.astype(np.float32) / 255)))) for p, label in zip(pixels,
                                                                               [0, 1, 1, 0]))
    assert stored == expected
