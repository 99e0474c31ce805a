r"""Purifies image files with a ComDefend model directory: PNG/JPEG in, PNG out.

    python -m export.purify_images --model_dir=runs/released_rgb \
        --input='photos/*.jpg' --output_dir=purified

Each input ``NAME.ext`` becomes ``OUTPUT_DIR/NAME.png`` (rounded to uint8). The command never
writes into a folder that holds an input and never replaces an existing output unless
``--overwrite`` is given (both are checked before any work starts). A file that cannot be read
is reported on stderr by name, the other images are still written, and the exit status is 1.
One summary line ends each run: images, seconds, mean PSNR of output against input.

To reproduce the authors' released outputs (not recommended for use): ``--channel_order=bgr
--patch_size=32 --inference_noise_std=1 --uint8_conversion=truncate``.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Model directory holding comdefend.keras (from "
                    "train.train_comdefend or train.import_reference_weights), or a .keras file.")
flags.DEFINE_string("input", None, "An image file, a folder (its .png/.jpg/.jpeg files) or a "
                    "quoted glob such as 'photos/*.jpg'.")
flags.DEFINE_string("output_dir", None, "Folder for the purified PNGs (created if missing); "
                    "must not be a folder that holds an input image.")
flags.DEFINE_integer("patch_size", 0, "Purify in tiles of this many pixels (0: the whole image "
                     "at once, best quality; the release used 32 to bound memory).", lower_bound=0)
flags.DEFINE_integer("overlap", 0, "Context pixels added on each side of every tile and then "
                     "discarded. At >= the receptive field radius (18 for the released models) "
                     "tiles give exactly the whole-image result; 0 reproduces the release's "
                     "seams.", lower_bound=0)
flags.DEFINE_integer("batch_size", 64, "Tiles per network call (bounds memory with "
                     "--patch_size).", lower_bound=1)
flags.DEFINE_float("inference_noise_std", None, "Standard deviation of the code noise (0: "
                   "deterministic; the release used 1.0). Default: the model's own setting.",
                   lower_bound=0.0)
flags.DEFINE_enum("channel_order", "rgb", ["rgb", "bgr"], "Channel order fed to the network. "
                  "'rgb' is correct for the released and our models; 'bgr' only reproduces the "
                  "authors' ImageNet script, which read images with OpenCV. Output files are "
                  "always written in normal RGB order.")
flags.DEFINE_integer("seed", None, "Seed of the inference noise (repeatable runs).")
flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16"], "Compute precision. "
                  "bfloat16 (Keras mixed_bfloat16 policy via comdefend_tf.precision: bf16 "
                  "convolutions, float32 weights, code logits and outputs) is faster on CPUs "
                  "with bf16 units but changes outputs by a few grey levels.")
flags.DEFINE_enum("uint8_conversion", "round", ["round", "truncate"], "How outputs become "
                  "uint8: 'round' (correct) or 'truncate', the release's astype(uint8), only to "
                  "reproduce the authors' files.")
flags.DEFINE_bool("overwrite", False, "Replace existing output files.")
flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
flags.mark_flags_as_required(["model_dir", "input", "output_dir"])


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from comdefend_tf import image_io, precision, reference
    from comdefend_tf.model import load_comdefend
    from comdefend_tf.purify_files import OutputPlanError, plan_outputs, purify_files

    def fail(message):
        print(f"error: {message}", file=sys.stderr)
        return 1

    try:
        input_paths = image_io.list_images(FLAGS.input)
        pairs = plan_outputs(input_paths, FLAGS.output_dir, FLAGS.overwrite)
        model = load_comdefend(FLAGS.model_dir, inference_noise_std=FLAGS.inference_noise_std,
                               seed=FLAGS.seed)
    except (FileNotFoundError, OutputPlanError, ValueError) as error:
        return fail(error)
    if FLAGS.channel_order == "bgr" and model.config.input_channels != 3:
        return fail(f"--channel_order=bgr needs a 3-channel model; this one has "
                    f"{model.config.input_channels}")
    model = precision.convert_model(model, FLAGS.precision)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    to_uint8 = (reference.truncate_to_uint8 if FLAGS.uint8_conversion == "truncate"
                else image_io.to_uint8)
    summary = purify_files(
        model, pairs, patch_size=FLAGS.patch_size, overlap=FLAGS.overlap,
        channel_order=FLAGS.channel_order, batch_size=FLAGS.batch_size, to_uint8=to_uint8,
        progress=FLAGS.progress, on_error=lambda message: print(f"error: {message}",
                                                               file=sys.stderr))
    print(summary.line())
    return 1 if summary.failures else 0


def main():
    """Console-script entry point (``comdefend-purify``)."""
    app.run(_main)


if __name__ == "__main__":
    main()
