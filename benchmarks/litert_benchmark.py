"""LiteRT against the SavedModel on this CPU: throughput, fidelity and file sizes.

    PYTHONPATH=. .venv/bin/python -m benchmarks.litert_benchmark --repeats=5

One process, every method timed in turn inside each repeat (interleaved, so background load
hits all alike), the median over ``--repeats`` after two warm-up calls each. Cases: 64x28x28x1,
64x32x32x3 and one 224x224x3 image patch-wise (SavedModel: in-graph tiles of
``--patch_file_size - 2 * radius`` with the radius as overlap; LiteRT: a file of
``--patch_file_size`` square, tiled the same way by the runtime). Methods: the serving export's
``purify`` signature in float32 and bfloat16 (Keras mixed_bfloat16 weights copy), LiteRT
float32 / float16 / dynamic_int8 / full_int8 with XNNPACK (LiteRT's default delegate), and
LiteRT float32 called image by image (is one resized batch call the right runtime design?).
Ratios are to the SavedModel float32 of the same case.

Fidelity (noise off everywhere): PSNR of each LiteRT variant's purified images against the
float32 Keras purifier's, and the share of code bits that agree; the bits come from the file's
own ``code_bits`` output, so no second encoder-only conversion is needed. Images: the embedded
mnist5k (1 channel) and photos32 (3 channels) when the [data] extra is there, else uniform noise
(recorded). Purifiers: --model_dir1 / --model_dir3, else a fresh seeded --config (untrained:
its fidelity numbers say how the formats compute, not how well a trained model purifies).
Markdown to stdout, JSON to --output.
"""

from __future__ import annotations

import datetime
import os
import platform
import tempfile
import time

import numpy as np
from absl import app, flags

flags.DEFINE_string("output", "benchmarks/results/litert.json", "Where the JSON goes.")
flags.DEFINE_integer("repeats", 5, "Timed repeats per method and case (median reported).",
                     lower_bound=1)
flags.DEFINE_string("config", "paper", "Config of the fresh purifiers when no model is given.")
flags.DEFINE_string("model_dir1", None, "Trained 1-channel purifier (default: a fresh one).")
flags.DEFINE_string("model_dir3", None, "Trained 3-channel purifier (default: a fresh one).")
flags.DEFINE_integer("patch_file_size", 96, "Side of the LiteRT file (and of the SavedModel's "
                     "windows) in the patch-wise 224x224 case.", lower_bound=8)
flags.DEFINE_integer("calibration_images", 100, "Calibration images for full_int8.",
                     lower_bound=1)
flags.DEFINE_integer("fidelity_images", 64, "Images per fidelity comparison.", lower_bound=1)
flags.DEFINE_integer("num_threads", None, "LiteRT interpreter threads (default: all cores).")

FLAGS = flags.FLAGS
CASES = (("64x28x28x1", (64, 28, 28, 1), (28, 28)),
         ("64x32x32x3", (64, 32, 32, 3), (32, 32)),
         ("1x224x224x3 patch-wise", (1, 224, 224, 3), None))
FIDELITY_SOURCES = {1: "mnist5k", 3: "photos32"}


def _purifier(channels: int):
    from comdefend_tf import ComDefend, get_config, load_comdefend

    model_dir = FLAGS.model_dir1 if channels == 1 else FLAGS.model_dir3
    if model_dir:
        return load_comdefend(model_dir, inference_noise_std=0.0)
    return ComDefend(get_config(FLAGS.config, input_channels=channels, inference_noise_std=0.0),
                     seed=0)


def _images(channels: int, size, count: int, seed: int):
    """(images float32 [count, *size, channels] in [0, 1], source name)."""
    from comdefend_tf.io import datasets

    try:
        data = datasets.load_dataset(FIDELITY_SOURCES[channels], image_size=size,
                                     color_mode="grayscale" if channels == 1 else "rgb")
        images, _ = datasets.take_arrays(data.test, count)
        if len(images) == count:
            return images, FIDELITY_SOURCES[channels]
    except Exception:  # the [data] extra missing or too few images: noise, recorded as such
        pass
    rng = np.random.default_rng(seed)
    return rng.random((count, *size, channels), dtype=np.float32), "uniform noise"


def _saved_model(purifier, patch_size: int, folder: str, precision: str):
    import tensorflow as tf

    from comdefend_tf.serving import export as serving_export
    from comdefend_tf.serving.settings import ExportSettings
    from comdefend_tf.training import precision as precision_lib

    model = precision_lib.convert_model(purifier, precision)
    archive = serving_export.build_export_archive(
        model, settings=ExportSettings(patch_size=patch_size, inference_noise_std=0.0))
    path = os.path.join(folder, f"{precision}_{patch_size}")
    archive.write_out(path, verbose=False)
    purify = tf.saved_model.load(path).signatures["purify"]
    return lambda images: purify(images=tf.constant(images))["purified"].numpy()


def _methods(purifier, file_size, patch_size, calibration, folder):
    from comdefend_tf.litert import convert
    from comdefend_tf.litert.runtime import LiteRTPurifier

    methods = {"savedmodel_float32": _saved_model(purifier, patch_size, folder, "float32"),
               "savedmodel_bfloat16": _saved_model(purifier, patch_size, folder, "bfloat16")}
    files = {}
    for variant in convert.VARIANTS:
        files[variant] = convert.convert(purifier, variant, file_size, 0.0, calibration)
        runtime = LiteRTPurifier(files[variant], num_threads=FLAGS.num_threads or os.cpu_count())
        methods[f"litert_{variant}"] = runtime.purify
    loop = LiteRTPurifier(files["float32"], num_threads=FLAGS.num_threads or os.cpu_count())
    methods["litert_float32_per_image"] = lambda images: np.concatenate(
        [loop.purify(images[i:i + 1]) for i in range(len(images))])
    return methods, files


def _psnr(reference, images) -> float:
    mse = float(np.mean((reference.astype(np.float64) - images) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def run_case(name, shape, file_size, folder) -> dict:
    from comdefend_tf.litert.runtime import LiteRTPurifier
    from comdefend_tf.patches import receptive_field_radius

    channels = shape[-1]
    purifier = _purifier(channels)
    radius = receptive_field_radius(purifier.config)
    if file_size is None:
        file_size = (FLAGS.patch_file_size, FLAGS.patch_file_size)
        patch_size = FLAGS.patch_file_size - 2 * radius
        if patch_size < 1:
            raise app.UsageError(f"--patch_file_size must exceed {2 * radius} for this config")
    else:
        patch_size = max(file_size)  # one window: the SavedModel purifies these whole
    calibration, _ = _images(channels, file_size, FLAGS.calibration_images, seed=1)
    methods, files = _methods(purifier, file_size, patch_size, calibration, folder)
    images = np.random.default_rng(2).random(shape, dtype=np.float32)
    for method in methods.values():  # warm-up
        method(images)
        method(images)
    seconds = {key: [] for key in methods}
    for _ in range(FLAGS.repeats):
        for key, method in methods.items():
            start = time.perf_counter()
            method(images)
            seconds[key].append(time.perf_counter() - start)
    base = float(np.median(seconds["savedmodel_float32"]))
    speed = {key: {"median_s": float(np.median(values)),
                   "images_per_s": shape[0] / float(np.median(values)),
                   "ratio_to_savedmodel_float32": base / float(np.median(values))}
             for key, values in seconds.items()}

    fidelity_images, source = _images(channels, file_size, FLAGS.fidelity_images, seed=3)
    reference = np.asarray(purifier(fidelity_images))
    reference_bits = np.asarray(purifier.code_bits(fidelity_images)).astype(np.uint8)
    fidelity = {}
    for variant, data in files.items():
        outputs = LiteRTPurifier(data)(fidelity_images)
        fidelity[variant] = {"psnr_db_vs_keras_float32": _psnr(reference, outputs["purified"]),
                             "code_bits_agree": float(np.mean(outputs["code_bits"]
                                                              == reference_bits)),
                             "bytes": len(data)}
    return {"case": name, "shape": list(shape), "file_size": list(file_size),
            "patch_size": patch_size, "overlap": radius, "config": purifier.config.name,
            "speed": speed, "fidelity": fidelity, "fidelity_images": source}


def markdown(results: list[dict]) -> str:
    lines = ["| case | method | images/s | x SavedModel fp32 |", "|---|---|---:|---:|"]
    for case in results:
        for method, speed in case["speed"].items():
            lines.append(f"| {case['case']} | {method} | {speed['images_per_s']:.1f} | "
                         f"{speed['ratio_to_savedmodel_float32']:.2f} |")
    lines += ["", "| case | variant | PSNR vs Keras fp32 (dB) | code bits agree | bytes |",
              "|---|---|---:|---:|---:|"]
    for case in results:
        for variant, row in case["fidelity"].items():
            lines.append(f"| {case['case']} ({case['fidelity_images']}) | {variant} | "
                         f"{row['psnr_db_vs_keras_float32']:.2f} | "
                         f"{row['code_bits_agree']:.4f} | {row['bytes']} |")
    return "\n".join(lines)


def main(argv):
    del argv
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as folder:
        results = [run_case(name, shape, size, folder) for name, shape, size in CASES]
    payload = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "machine": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "load_average": os.getloadavg(),
               "tensorflow": tf.__version__, "repeats": FLAGS.repeats, "cases": results}
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    from comdefend_tf.io.atomic import write_json_atomic

    write_json_atomic(FLAGS.output, payload)
    print(markdown(results))
    print(f"\nJSON: {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
