r"""Converts a trained ComDefend purifier to a LiteRT (.tflite) file for phones and edge boxes.

    python -m export.export_litert --model_dir=runs/mnist --output=purifier.tflite \
        --variant=full_int8 --image_size=28,28 --representative_data=mnist5k

Writes PATH (the model) and PATH.json (variant, image size, noise, op report: which ops run in
int8 and which stay float, sizes, the source's weights fingerprint), each atomically: a killed
run leaves no half-written file, and an existing PATH is replaced only with --overwrite.
The source is a trained purifier (--model_dir) or a serving export version (--saved_model).
Variants: float32, float16 (weights), dynamic_int8 (weights), full_int8 (weights and
activations, calibrated on --representative_images images of --representative_data, resized
to --image_size). --noise=on (the default, as deployed) draws the code noise in the file on
every call, fresh per process; --noise=off converts a deterministic purifier and says so in
PATH.json. The op report needs the [litert] extra. Exit status: 0 written; 1 nothing written
(one ``error:`` line on stderr: missing model, bad --image_size, bad representative source...).
See docs/litert.md.
"""

from __future__ import annotations

import sys

from absl import app, flags

from comdefend_tf.cli import exit_codes
from comdefend_tf.cli import flags as shared_flags
from comdefend_tf.litert.convert import VARIANTS

MAX_REPRESENTATIVE_IMAGES = 2000

FLAGS = flags.FLAGS
shared_flags.define_inference_noise_flag()
flags.DEFINE_string("model_dir", None, "Trained purifier: a model directory holding "
                    "comdefend.keras, or a .keras file.")
flags.DEFINE_string("saved_model", None, "Instead of --model_dir: a serving export version "
                    "folder (EXPORT_BASE/VERSION from export.export_savedmodel).")
flags.DEFINE_string("output", None, "The .tflite file to write; PATH.json is written beside it.")
flags.DEFINE_enum("variant", "float32", list(VARIANTS), "float32; float16 (weights stored in "
                  "float16, half the size); dynamic_int8 (int8 weights, a quarter of the size); "
                  "full_int8 (int8 weights and activations, calibrated on "
                  "--representative_data; ops without int8 kernels stay float).")
shared_flags.define_image_size_flag("HEIGHT,WIDTH of the file's input (fixed per file; "
                                    "channels come from the model). The runtime purifies "
                                    "smaller images whole and larger ones in exact overlapping "
                                    "tiles of this size.")
flags.DEFINE_string("representative_data", None, "Calibration images for full_int8: "
                    "folder:PATH, tfrecord:GLOB or an embedded set such as mnist5k; resized to "
                    "--image_size and converted to the model's channels.")
flags.DEFINE_integer("representative_images", 200, "How many calibration images to use.",
                     lower_bound=1, upper_bound=MAX_REPRESENTATIVE_IMAGES)
flags.DEFINE_enum("noise", "on", ["on", "off"], "on: the code noise of the deployed purifier "
                  "(--inference_noise_std, else the model's) is drawn in the file on every "
                  "call, fresh per process; off: a deterministic purifier (recorded in "
                  "PATH.json).")
flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")
flags.mark_flags_as_required(["output", "image_size"])


def _image_size() -> tuple[int, int]:
    return shared_flags.parse_image_size(FLAGS.image_size)


def _load_purifier():
    """(purifier, source record, deployed noise std) from --model_dir or --saved_model."""
    from comdefend_tf.litert import convert
    from comdefend_tf.model import load_comdefend

    if (FLAGS.model_dir is None) == (FLAGS.saved_model is None):
        raise ValueError("give exactly one of --model_dir and --saved_model")
    if FLAGS.model_dir is not None:
        purifier = load_comdefend(FLAGS.model_dir)
        return purifier, {"model_dir": FLAGS.model_dir}, purifier.config.inference_noise_std
    purifier, metadata = convert.purifier_from_saved_model(FLAGS.saved_model)
    return (purifier, {"saved_model": FLAGS.saved_model},
            float(metadata.get("effective_inference_noise_std",
                               purifier.config.inference_noise_std)))


def _noise_std(deployed_std: float) -> float:
    if FLAGS.noise == "off":
        if FLAGS.inference_noise_std:
            raise ValueError("--inference_noise_std cannot be combined with --noise=off")
        return 0.0
    std = deployed_std if FLAGS.inference_noise_std is None else FLAGS.inference_noise_std
    if std <= 0:
        raise ValueError("--noise=on but the purifier's inference noise std is 0: there is no "
                         "noise to draw; pass --inference_noise_std=STD or --noise=off")
    return float(std)


def _representative(image_size, channels: int):
    from comdefend_tf.io import datasets

    if FLAGS.variant != "full_int8":
        if FLAGS.representative_data:
            raise ValueError(f"--representative_data is used only by --variant=full_int8, "
                             f"not {FLAGS.variant}")
        return None, None
    if not FLAGS.representative_data:
        raise ValueError("--variant=full_int8 needs --representative_data (calibration images)")
    color_mode = {1: "grayscale", 3: "rgb"}.get(channels)
    if color_mode is None:
        raise ValueError(f"calibration images are read as grey or RGB; the model takes "
                         f"{channels} channels")
    data = datasets.load_dataset(FLAGS.representative_data, image_size=image_size,
                                 color_mode=color_mode)
    images, _ = datasets.take_arrays(data.train, FLAGS.representative_images)
    return images, {"source": FLAGS.representative_data, "images": int(len(images))}


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import os

    import tensorflow as tf

    from comdefend_tf import optional
    from comdefend_tf.io.atomic import write_bytes_atomic, write_json_atomic
    from comdefend_tf.io.datasets import DataError
    from comdefend_tf.litert import convert
    from comdefend_tf.litert import ops as litert_ops
    from comdefend_tf.training import provenance

    try:
        image_size = _image_size()
        if FLAGS.output.endswith(os.sep) or os.path.isdir(FLAGS.output):
            raise ValueError(f"--output must be a file path, got the folder {FLAGS.output!r}")
        if not FLAGS.overwrite and os.path.lexists(FLAGS.output):
            raise ValueError(f"{FLAGS.output!r} exists; pass --overwrite to replace it")
        purifier, source, deployed_std = _load_purifier()
        noise_std = _noise_std(deployed_std)
        representative, calibration = _representative(image_size,
                                                       purifier.config.input_channels)
        model = convert.convert(purifier, FLAGS.variant, image_size, noise_std, representative)
        report = litert_ops.op_report(model)
    except (FileNotFoundError, ValueError, DataError, optional.MissingExtra) as error:
        print(f"error: {error}", file=sys.stderr)
        return exit_codes.COULD_NOT_START
    sidecar = {
        "variant": FLAGS.variant, "image_size": list(image_size),
        "channels": purifier.config.input_channels,
        "code_channels": purifier.config.code_channels,
        "noise": FLAGS.noise, "noise_std": noise_std,
        "noise_source": ("none" if noise_std == 0 else
                         "litert RANDOM_STANDARD_NORMAL, seed 0/0: fresh per call and per "
                         "interpreter, seeded from /dev/urandom per process"),
        "bytes": len(model), "op_report": report, "calibration": calibration,
        "source": source, "purifier_fingerprint": provenance.weights_fingerprint(purifier),
        "comdefend_config": purifier.config.to_dict(), "tensorflow": tf.__version__,
    }
    try:
        write_bytes_atomic(FLAGS.output, model, replace=FLAGS.overwrite)
        write_json_atomic(FLAGS.output + ".json", sidecar, replace=True)
    except FileExistsError:
        print(f"error: {FLAGS.output!r} appeared meanwhile; not replaced without --overwrite",
              file=sys.stderr)
        return exit_codes.COULD_NOT_START
    except OSError as error:
        print(f"error: cannot write {FLAGS.output!r}: {error.strerror or error}",
              file=sys.stderr)
        return exit_codes.COULD_NOT_START
    counts = report["counts"]
    print(f"wrote {FLAGS.output} ({FLAGS.variant}, {len(model)} bytes, "
          f"{image_size[0]}x{image_size[1]}x{purifier.config.input_channels}, noise "
          f"{FLAGS.noise}): {counts['int8']} int8 ops, {counts['float']} float ops, "
          f"{counts['boundary']} quantize/dequantize or hybrid ops")
    return exit_codes.OK


def main():
    """Console-script entry point (``comdefend-export-litert``)."""
    app.run(_main)


if __name__ == "__main__":
    main()
