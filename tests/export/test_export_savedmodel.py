"""The export binary and what a model server needs from its output.

TF Serving itself cannot be installed here, so the proof is: ``saved_model_cli show --all``
and ``saved_model_cli run`` (session-based loading, as the model server does it) on float and
bytes inputs; a fresh Python process in which ``comdefend_tf`` cannot be imported loads the
export with ``tf.saved_model.load`` and reproduces the Keras model; every op in the graph and
in its function library is in TensorFlow's standard op registry (no PyFunc, no custom ops).
Also: atomic, versioned, never-overwriting writes.
"""

import json
import os
import subprocess
import sys
import textwrap
from concurrent import futures

import keras
import numpy as np
import pytest
import tensorflow as tf

from comdefend_tf import ComDefend, get_config, save_comdefend
from comdefend_tf.training import classifier as classifiers
from comdefend_tf.serving import export as serving_export
from comdefend_tf.serving.settings import ExportSettings
from tests.conftest import REPO_ROOT, subprocess_env

SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
IMAGE_SHAPE = (8, 8, 1)


def _run(command, cwd=REPO_ROOT, env=None, timeout=240):
    return subprocess.run(command, cwd=cwd, env=env or subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny purifier and classifier saved as model dirs, exported once by the binary."""
    root = tmp_path_factory.mktemp("export")
    purifier = ComDefend(get_config("tiny", input_channels=1), seed=11)
    comdefend_dir = str(root / "comdefend")
    save_comdefend(purifier, comdefend_dir)
    classifier = keras.Sequential([keras.Input(IMAGE_SHAPE), keras.layers.Flatten(),
                                   keras.layers.Dense(5)], name="tiny_classifier")
    classifier_dir = str(root / "classifier")
    classifiers.save_classifier(classifier, classifier_dir)
    export_base = str(root / "exports")
    result = _run([sys.executable, "-m", "export.export_savedmodel",
                   f"--comdefend_dir={comdefend_dir}", f"--classifier_dir={classifier_dir}",
                   f"--export_base={export_base}", "--patch_size=16"])
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "purifier": purifier, "classifier": classifier,
            "comdefend_dir": comdefend_dir, "classifier_dir": classifier_dir,
            "export_base": export_base, "version_dir": os.path.join(export_base, "1"),
            "stdout": result.stdout}


def _sample_images(count=2, seed=0):
    return np.random.RandomState(seed).rand(count, *IMAGE_SHAPE).astype(np.float32)


def _keras_purified(exported, images):
    return np.asarray(exported["purifier"](images))


# --------------------------------------------------------------------------------- binary
def test_binary_prints_the_export_path_and_next_commands(exported):
    stdout, base = exported["stdout"], exported["export_base"]
    assert f"Exported SavedModel: {exported['version_dir']}" in stdout
    assert f"saved_model_cli show --all --dir {exported['version_dir']}" in stdout
    assert "--signature_def serving_default --inputs images=images.npy" in stdout
    assert (f"tensorflow_model_server --rest_api_port=8501 --model_name=comdefend "
            f"--model_base_path={base}") in stdout
    assert sorted(os.listdir(base)) == ["1"]  # no temporary folder left behind
    metadata_path = os.path.join(exported["version_dir"], serving_export.EXPORT_METADATA_FILENAME)
    with open(metadata_path) as handle:
        metadata = json.load(handle)
    assert metadata["serving_default"] == "classify"
    assert metadata["signatures"] == ["classify", "purify", "purify_bytes", "purify_examples"]
    assert metadata["effective_inference_noise_std"] == 0.0


# ------------------------------------------------------------------------- saved_model_cli
def test_saved_model_cli_show_lists_the_signatures(exported):
    result = _run([SAVED_MODEL_CLI, "show", "--all", "--dir", exported["version_dir"]])
    assert result.returncode == 0, result.stderr[-2000:]
    shown = result.stdout
    for name in ("purify", "purify_bytes", "classify", "serving_default"):
        assert f"signature_def['{name}']" in shown
    assert "inputs['image_bytes'] tensor_info:\n        dtype: DT_STRING" in shown
    assert "outputs['code_bits'] tensor_info:\n        dtype: DT_UINT8" in shown
    assert "outputs['purified_png_bytes'] tensor_info:\n        dtype: DT_STRING" in shown
    assert "outputs['probabilities'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1, 5)" in shown
    assert "outputs['purified'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1, -1, -1, 1)" in shown


def test_saved_model_cli_run_on_float_and_bytes_inputs(exported, tmp_path):
    images = _sample_images(seed=1)
    np.save(tmp_path / "images.npy", images)
    result = _run([SAVED_MODEL_CLI, "run", "--dir", exported["version_dir"], "--tag_set",
                   "serve", "--signature_def", "purify", "--inputs",
                   f"images={tmp_path / 'images.npy'}", "--outdir", str(tmp_path / "float")])
    assert result.returncode == 0, result.stderr[-3000:]
    purified = np.load(tmp_path / "float" / "purified.npy")
    np.testing.assert_allclose(purified, _keras_purified(exported, images), atol=1e-5)
    bits = np.load(tmp_path / "float" / "code_bits.npy")
    assert bits.dtype == np.uint8 and bits.shape == (2, 8, 8, 4)

    pixels = np.round(images * 255).astype(np.uint8)
    encoded = np.empty(2, dtype=object)
    encoded[:] = [tf.io.encode_png(pixels[0]).numpy(), tf.io.encode_jpeg(pixels[1]).numpy()]
    np.save(tmp_path / "bytes.npy", encoded, allow_pickle=True)
    result = _run([SAVED_MODEL_CLI, "run", "--dir", exported["version_dir"], "--tag_set",
                   "serve", "--signature_def", "purify_bytes", "--inputs",
                   f"image_bytes={tmp_path / 'bytes.npy'}", "--outdir", str(tmp_path / "bytes")])
    assert result.returncode == 0, result.stderr[-3000:]
    pngs = np.load(tmp_path / "bytes" / "purified_png_bytes.npy", allow_pickle=True)
    first = tf.io.decode_png(pngs[0]).numpy()
    expected = np.round(_keras_purified(exported, pixels[:1].astype(np.float32) / 255)[0] * 255)
    assert first.shape == (8, 8, 1) and np.abs(first - expected).max() <= 1
    assert tf.io.decode_png(pngs[1]).shape == (8, 8, 1)


def test_saved_model_cli_run_refuses_a_rank_3_tensor_with_a_clear_error(exported, tmp_path):
    # Fed straight to a convolution, a rank-3 tensor aborted the whole process; the graph
    # must refuse it first, in the session-based loader a model server uses.
    np.save(tmp_path / "rank3.npy", _sample_images()[0])
    result = _run([SAVED_MODEL_CLI, "run", "--dir", exported["version_dir"], "--tag_set",
                   "serve", "--signature_def", "purify", "--inputs",
                   f"images={tmp_path / 'rank3.npy'}"])
    assert result.returncode != 0
    assert "InvalidArgumentError" in result.stderr
    assert "images must be a rank-4 tensor" in result.stderr


def test_saved_model_cli_run_refuses_hostile_requests_by_name(exported, tmp_path):
    # Issue 21, in the session-based loader: declared sizes whose int64 sum wraps around,
    # 1 MB of garbage as a tf.train.Example (its parse error used to quote it whole, raw) and
    # a JPEG whose scan is cut short, each refused by name with a short message.
    from tests.fixtures import hostile_requests_round2 as round2
    from tests.fixtures.hostile_requests import png_with_header

    valid = tf.io.encode_png(np.zeros((8, 8, 1), np.uint8)).numpy()
    huge = png_with_header(2 ** 31 - 1, 2 ** 31 - 1)
    garbage = np.random.RandomState(0).randint(1, 256, 1 << 20, dtype=np.uint8).tobytes()
    photo = np.random.RandomState(1).randint(0, 256, (16, 16, 3)).astype(np.uint8)
    requests = {
        "wrap": ("purify_bytes", "image_bytes", [valid] + [huge] * 4, "alone declares"),
        "garbage": ("purify_examples", "examples", [garbage],
                    "is not a serialized tf.train.Example"),
        "cut": ("purify_bytes", "image_bytes",
                [round2.scan_cut(round2._pillow_jpeg(photo, quality=90), 0.5)],
                "truncated JPEG"),
    }
    for name, (signature, input_name, values, expected) in requests.items():
        np.save(tmp_path / f"{name}.npy", np.array(values, dtype=object), allow_pickle=True)
        result = _run([SAVED_MODEL_CLI, "run", "--dir", exported["version_dir"], "--tag_set",
                       "serve", "--signature_def", signature, "--inputs",
                       f"{input_name}={tmp_path / f'{name}.npy'}"])
        assert result.returncode != 0, name
        assert "InvalidArgumentError" in result.stderr and expected in result.stderr, (
            name, result.stderr[-2000:])
        assert len(result.stderr) < 100_000, name  # not the 1 MB request echoed back


# ---------------------------------------------------------------- fresh process, op registry
FRESH_PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    try:
        import comdefend_tf  # noqa: F401
        package_importable = True
    except ImportError:
        package_importable = False
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.framework import op_def_registry

    version_dir, images_path, out_path = sys.argv[1:4]
    loaded = tf.saved_model.load(version_dir)
    images = np.load(images_path)
    purify = loaded.signatures["purify"](images=tf.constant(images))
    # Larger than the export's 16-pixel tiles, and not a multiple of them.
    large = np.random.RandomState(7).rand(1, 37, 50, 1).astype(np.float32)
    purify_large = loaded.signatures["purify"](images=tf.constant(large))
    default = loaded.signatures["serving_default"](images=tf.constant(images))
    png = tf.io.encode_png(tf.cast(tf.round(images[0] * 255), tf.uint8)).numpy()
    pngs = loaded.signatures["purify_bytes"](image_bytes=tf.constant([png]))
    try:
        loaded.signatures["purify"](images=tf.constant(images[:, :, :, :1] * 2))
        range_error = None
    except tf.errors.InvalidArgumentError as error:
        range_error = error.message

    saved_model = saved_model_pb2.SavedModel()
    with open(version_dir + "/saved_model.pb", "rb") as handle:
        saved_model.ParseFromString(handle.read())
    ops, functions = set(), set()
    for meta_graph in saved_model.meta_graphs:
        library = meta_graph.graph_def.library
        functions |= {function.signature.name for function in library.function}
        ops |= {node.op for node in meta_graph.graph_def.node}
        for function in library.function:
            ops |= {node.op for node in function.node_def}
    ops -= functions  # calls of library functions are not ops
    np.savez(out_path, purified=purify["purified"].numpy(), code_bits=purify["code_bits"].numpy(),
             probabilities=default["probabilities"].numpy(),
             class_ids=default["class_ids"].numpy(),
             purified_large=purify_large["purified"].numpy(),
             png=np.frombuffer(pngs["purified_png_bytes"].numpy()[0], np.uint8))
    with open(out_path + ".json", "w") as handle:
        json.dump({"package_importable": package_importable, "ops": sorted(ops),
                   "unregistered": sorted(op for op in ops if op_def_registry.get(op) is None),
                   "range_error": range_error, "sys_path": sys.path}, handle)
""")


@pytest.fixture(scope="module")
def fresh_process(exported):
    folder = exported["root"] / "fresh"
    folder.mkdir()
    (folder / "check.py").write_text(FRESH_PROCESS_SCRIPT)
    images = _sample_images(3, seed=2)
    np.save(folder / "images.npy", images)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = _run([sys.executable, "-I", str(folder / "check.py"), exported["version_dir"],
                   str(folder / "images.npy"), str(folder / "out.npz")], cwd=str(folder), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(folder / "out.npz.json") as handle:
        report = json.load(handle)
    return images, dict(np.load(folder / "out.npz")), report


def test_a_fresh_process_without_the_package_reproduces_the_keras_model(exported, fresh_process):
    images, outputs, report = fresh_process
    assert not report["package_importable"]
    assert REPO_ROOT not in report["sys_path"]
    purified = _keras_purified(exported, images)
    np.testing.assert_allclose(outputs["purified"], purified, atol=1e-5)
    expected_bits = np.asarray(exported["purifier"].code_bits(images)).astype(np.uint8)
    assert np.mean(outputs["code_bits"] == expected_bits) > 0.999
    logits = np.asarray(exported["classifier"](purified))
    np.testing.assert_allclose(outputs["probabilities"], tf.nn.softmax(logits).numpy(),
                               atol=1e-5)
    np.testing.assert_array_equal(outputs["class_ids"], logits.argmax(axis=1))
    # Tiled inside the graph (16-pixel tiles, receptive-field overlap) = whole-image Keras.
    large = np.random.RandomState(7).rand(1, 37, 50, 1).astype(np.float32)
    np.testing.assert_allclose(outputs["purified_large"], _keras_purified(exported, large),
                               atol=1e-5)
    png = tf.io.decode_png(outputs["png"].tobytes()).numpy()
    assert png.shape == IMAGE_SHAPE
    assert "values in [0, 1]" in report["range_error"]


def test_the_graph_uses_only_standard_registered_ops(fresh_process):
    _, _, report = fresh_process
    ops = set(report["ops"])
    assert report["unregistered"] == []
    assert not ops & {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
    # The walk reached the nested functions (while-loop body, cond branches, decoders).
    assert {"Conv2D", "While", "Assert", "DecodePng", "DecodeJpeg", "ExtractJpegShape",
            "EncodePng", "Softmax"} <= ops
    # Only the two decoders the signature documents: no generic DecodeImage (GIF, BMP, WebP).
    assert not ops & {"DecodeImage", "DecodeGif", "DecodeBmp", "DecodeWebP"}


# ----------------------------------------------------------------- atomic versioned writes
@pytest.fixture(scope="module")
def small_purifier():
    return ComDefend(get_config("tiny", input_channels=1), seed=12)


def test_versions_count_up_from_the_highest_numeric_folder(tmp_path):
    for name in ("1", "3", "notes", "7x", ".partial-9-abc"):
        (tmp_path / name).mkdir()
    (tmp_path / "12").write_text("a file, not a version")
    assert serving_export.list_versions(str(tmp_path)) == [1, 3]
    assert serving_export.next_version(str(tmp_path)) == 4
    assert serving_export.next_version(str(tmp_path / "missing")) == 1


def test_a_crash_mid_write_leaves_no_version_behind(small_purifier, tmp_path, monkeypatch):
    base = tmp_path / "exports"

    def write_half_then_fail(archive, folder, metadata):
        with open(os.path.join(folder, "saved_model.pb"), "wb") as handle:
            handle.write(b"\x08\x01 half a protobuf")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(serving_export, "_write_version", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        serving_export.export_savedmodel(small_purifier, str(base), version=1)
    assert os.listdir(base) == []  # neither "1" nor the temporary folder
    monkeypatch.undo()

    # A hard kill leaves the hidden temporary folder; servers and numbering ignore it.
    (base / ".partial-1-killed").mkdir()
    (base / ".partial-1-killed" / "saved_model.pb").write_bytes(b"truncated")
    noisy = ExportSettings(inference_noise_std=3.0, noise_seed=5)
    written = serving_export.export_savedmodel(small_purifier, str(base), settings=noisy)
    assert written == str(base / "1")
    assert sorted(os.listdir(base)) == ["1"]  # the killed export's folder was removed
    # Seeded noise is still fresh per call after reload.
    purify = tf.saved_model.load(written).signatures["purify"]
    images = tf.constant(_sample_images(1, seed=3))
    first, second = purify(images=images)["code_bits"], purify(images=images)["code_bits"]
    assert np.mean(first.numpy() != second.numpy()) > 0.05


class _FakeArchive:
    """Writes a marker instead of a SavedModel: the versioning logic does not need one."""

    def __init__(self, marker):
        self.marker = marker

    def write_out(self, folder, verbose=False):
        with open(os.path.join(folder, "saved_model.pb"), "w") as handle:
            handle.write(self.marker)


def test_existing_versions_are_kept_unless_overwrite(small_purifier, tmp_path, monkeypatch):
    markers = iter(["first", "second", "replacement"])
    monkeypatch.setattr(serving_export, "build_export_archive",
                        lambda *args, **kwargs: _FakeArchive(next(markers)))
    base = str(tmp_path)
    first = serving_export.export_savedmodel(small_purifier, base)
    second = serving_export.export_savedmodel(small_purifier, base)
    assert (first, second) == (os.path.join(base, "1"), os.path.join(base, "2"))
    with pytest.raises(FileExistsError, match="overwrite"):
        serving_export.export_savedmodel(small_purifier, base, version=1)
    with open(os.path.join(first, "saved_model.pb")) as handle:
        assert handle.read() == "first"
    noisy = ExportSettings(inference_noise_std=2.0)
    replaced = serving_export.export_savedmodel(small_purifier, base, settings=noisy, version=1,
                                         overwrite=True)
    assert replaced == first
    with open(os.path.join(first, "saved_model.pb")) as handle:
        assert handle.read() == "replacement"
    with open(os.path.join(first, serving_export.EXPORT_METADATA_FILENAME)) as handle:
        assert json.load(handle)["effective_inference_noise_std"] == 2.0
    assert sorted(os.listdir(base)) == ["1", "2"]  # the retired copy is gone
    with pytest.raises(ValueError, match="positive integer"):
        serving_export.export_savedmodel(small_purifier, base, version=0)


def test_stale_temporary_folders_of_dead_exports_are_removed(small_purifier, tmp_path,
                                                             monkeypatch):
    monkeypatch.setattr(serving_export, "build_export_archive",
                        lambda *args, **kwargs: _FakeArchive("new"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f".partial-4-pid{dead.pid}-x1"
    live = f".partial-9-pid{os.getpid()}-x2"  # an export still running in a live process
    retired = f".retired-2-pid{dead.pid}-x3"
    for name in (stale, live, retired, "3"):
        (tmp_path / name).mkdir()
    serving_export.export_savedmodel(small_purifier, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([live, "3", "4"])


# --------------------------------------------------------------------------- served noise
NOISE_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf

    images = np.load(sys.argv[1])
    draws = {}
    for key, version_dir in zip(("unseeded", "seeded"), sys.argv[2:4]):
        purify = tf.saved_model.load(version_dir).signatures["purify"]
        draws[key + "_first"] = purify(images=tf.constant(images))["code_bits"].numpy()
        draws[key + "_second"] = purify(images=tf.constant(images))["code_bits"].numpy()
    np.savez(sys.argv[4], **draws)
""")


@pytest.fixture(scope="module")
def noisy_exports(tmp_path_factory):
    """One tiny purifier exported with noise twice: without a seed and with ``noise_seed``."""
    root = tmp_path_factory.mktemp("noise")
    purifier = ComDefend(get_config("tiny", input_channels=1), seed=13)
    unseeded = serving_export.export_savedmodel(
        purifier, str(root / "unseeded"), settings=ExportSettings(inference_noise_std=4.0))
    seeded = serving_export.export_savedmodel(
        purifier, str(root / "seeded"),
        settings=ExportSettings(inference_noise_std=4.0, noise_seed=1234))
    images = np.random.RandomState(5).rand(2, 12, 12, 1).astype(np.float32)
    np.save(root / "images.npy", images)
    (root / "draw.py").write_text(NOISE_SCRIPT)
    return {"root": root, "unseeded": unseeded, "seeded": seeded, "images": images}


def _differ(first, second):
    return np.mean(first != second) > 0.05


def test_fresh_processes_draw_fresh_noise_unless_a_seed_was_exported(noisy_exports):
    root = noisy_exports["root"]
    draws = []
    for index in range(2):  # two fresh processes, each loading both exports
        out = root / f"draws{index}.npz"
        result = _run([sys.executable, str(root / "draw.py"), str(root / "images.npy"),
                       noisy_exports["unseeded"], noisy_exports["seeded"], str(out)])
        assert result.returncode == 0, result.stderr[-3000:]
        draws.append(dict(np.load(out)))
    first, second = draws
    for draw in draws:  # within a process, every call draws afresh
        assert _differ(draw["unseeded_first"], draw["unseeded_second"])
        assert _differ(draw["seeded_first"], draw["seeded_second"])
    # No seed: the files do not determine the noise; another process draws other noise.
    assert _differ(first["unseeded_first"], second["unseeded_first"])
    assert _differ(first["unseeded_second"], second["unseeded_second"])
    # A requested seed: every process replays the same sequence.
    np.testing.assert_array_equal(first["seeded_first"], second["seeded_first"])
    np.testing.assert_array_equal(first["seeded_second"], second["seeded_second"])


def _random_ops(version_dir):
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(version_dir, "saved_model.pb"), "rb") as handle:
        saved_model.ParseFromString(handle.read())
    nodes = []
    for meta_graph in saved_model.meta_graphs:
        nodes += list(meta_graph.graph_def.node)
        for function in meta_graph.graph_def.library.function:
            nodes += list(function.node_def)
    return [node for node in nodes if "Random" in node.op or "Rng" in node.op]


def test_no_saved_variable_decides_the_served_noise(noisy_exports):
    unseeded = _random_ops(noisy_exports["unseeded"])
    # The draws are stateful RandomStandardNormal ops with seed 0/0 (seeded from OS entropy
    # when loaded); no stateless op, which is what a saved seed/counter variable would feed.
    assert unseeded and {node.op for node in unseeded} == {"RandomStandardNormal"}
    assert {(node.attr["seed"].i, node.attr["seed2"].i) for node in unseeded} == {(0, 0)}
    seeded = _random_ops(noisy_exports["seeded"])
    assert {node.op for node in seeded} == {"RandomStandardNormal"}
    assert {node.attr["seed"].i for node in seeded} == {1234}
    # Each signature draws its own stream (seed2), so purify and classify never share one.
    assert len({node.attr["seed2"].i for node in seeded}) >= 2
    metadata_path = os.path.join(noisy_exports["unseeded"], serving_export.EXPORT_METADATA_FILENAME)
    with open(metadata_path) as f:
        assert json.load(f)["noise_source"] == "os_entropy_per_process"


@pytest.mark.parametrize("which", ["unseeded", "seeded"])
def test_concurrent_calls_never_share_a_draw(noisy_exports, which):
    purify = tf.saved_model.load(noisy_exports[which]).signatures["purify"]
    images = tf.constant(noisy_exports["images"])
    purify(images=images)  # warm up before the threads start

    def call(_):
        return [purify(images=images)["code_bits"].numpy() for _ in range(3)]

    with futures.ThreadPoolExecutor(max_workers=6) as pool:
        draws = [draw for batch in pool.map(call, range(6)) for draw in batch]
    assert len(draws) == 18
    for i in range(len(draws)):
        for j in range(i + 1, len(draws)):
            assert _differ(draws[i], draws[j]), (i, j)
