r"""Purifies image files with a ComDefend model directory: PNG/JPEG in, PNG out.

    python -m export.purify_images --model_dir=runs/released_rgb \
        --input='photos/*.jpg' --output_dir=purified

Each input ``NAME.ext`` becomes ``OUTPUT_DIR/NAME.png`` (rounded to uint8). The command never
writes into a folder that holds an input, never over an input file, never outside
``--output_dir``, and never replaces an existing output unless ``--overwrite`` is given (all
checked before any work starts; an output that appears during the run, e.g. another run's,
is kept too, and its input is refused). An ``--output_dir`` that is a file or lies below one
is an ``error:`` line (exit 1).

Reading (``comdefend_tf.io.images``): only PNG and JPEG, recognised by content whatever the
file's name; anything else (EPS, GIF, TIFF, BMP, ... even named ``x.png``) is refused unopened.
8-bit values are read as value/255, 16-bit PNGs at full precision as value/65535 (the serving
signatures' rule); palettes are expanded, grey is repeated for a 3-channel model, alpha is
dropped (colours used as stored, not composited); EXIF orientation is applied so phone photos
are upright. Refused, by name and with the reason, and skipped while the other files go on:
files over --max_file_bytes (before reading), images declaring more than --max_image_pixels
(before decoding: a 69-byte PNG declaring 20000x20000 costs 69 bytes), other formats, corrupt
or truncated data (also before decoding: a JPEG scan cut short or without its end marker, data
too short for the pixels declared; decoding work is bounded per input byte, see
``comdefend_tf.io.headers.check_payload``), JPEGs with other than 1 or 3 colour components,
unreadable files, FIFOs and devices, and links leading outside the input folder or dangling. ``**`` globs do not follow
links to folders (no loops). More than --max_files matches stops the run before any work.

Memory: without --patch_size, images above --tile_above_pixels are tiled automatically with
the receptive-field radius as overlap, which is exactly the whole-image result.

Output: one summary line on stdout (images, seconds, refusals, mean PSNR of output against
input), then each refused file with its reason on stderr. Exit status: 0 every input was
purified; 1 the run could not start (flags, unsafe output plan, no inputs, unreadable model;
nothing written); 2 the run finished but some inputs were refused (the others are written).

A LiteRT purifier (from export.export_litert) is given as ``--model_dir=PATH.tflite``: the same
inputs, refusals, outputs and exit statuses; its noise is the one fixed in the file (so
--inference_noise_std, --seed and --precision=bfloat16 are refused), and it tiles exactly by
itself within its input size (so --patch_size, --overlap and --tile_above_pixels are refused).
It needs the [litert] extra.

To reproduce the authors' released outputs (not recommended for use): ``--channel_order=bgr
--patch_size=32 --inference_noise_std=1 --uint8_conversion=truncate``.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from comdefend_tf.cli import exit_codes
from comdefend_tf.cli import flags as shared_flags

FLAGS = flags.FLAGS
shared_flags.define_inference_noise_flag()
shared_flags.define_precision_flag(choices=("float32", "bfloat16"))
flags.DEFINE_string("model_dir", None, "Model directory holding comdefend.keras (from "
                    "train.train_comdefend or train.import_reference_weights), a .keras file, "
                    "or a .tflite file from export.export_litert (the LiteRT purifier).")
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
flags.DEFINE_enum("channel_order", "rgb", ["rgb", "bgr"], "Channel order fed to the network. "
                  "'rgb' is correct for the released and our models; 'bgr' only reproduces the "
                  "authors' ImageNet script, which read images with OpenCV. Output files are "
                  "always written in normal RGB order.")
flags.DEFINE_integer("seed", None, "Seed of the inference noise (repeatable runs).")
flags.DEFINE_enum("uint8_conversion", "round", ["round", "truncate"], "How outputs become "
                  "uint8: 'round' (correct) or 'truncate', the release's astype(uint8), only to "
                  "reproduce the authors' files.")
shared_flags.define_file_limit_flags()
flags.DEFINE_bool("overwrite", False, "Replace existing output files.")
flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
flags.mark_flags_as_required(["model_dir", "input", "output_dir"])


LITERT_SUFFIX = ".tflite"


def _load_litert(max_image_pixels: int):
    """The LiteRT purifier at --model_dir; ValueError for flags that a .tflite file fixes."""
    from comdefend_tf.litert import runtime

    fixed = [name for name, given in (("--inference_noise_std",
                                       FLAGS.inference_noise_std is not None),
                                      ("--seed", FLAGS.seed is not None),
                                      ("--precision", FLAGS.precision != "float32")) if given]
    if fixed:
        raise ValueError(f"{', '.join(fixed)} cannot apply to a .tflite purifier: its noise "
                         "and precision are fixed in the file (export.export_litert)")
    # One image per call; its pixel budget is the command's --max_image_pixels.
    return runtime.LiteRTPurifier(FLAGS.model_dir, max_pixels=max_image_pixels,
                                  max_batch_size=1)


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from comdefend_tf.io import images as image_io
    from comdefend_tf.model import load_comdefend
    from comdefend_tf.purification import files, plan, refusals
    from comdefend_tf.training import precision
    from comdefend_tf.weights import parity

    def chosen(value, default):
        return default if value is None else value

    try:
        listing = plan.list_files(FLAGS.input, chosen(FLAGS.max_files, plan.DEFAULT_MAX_FILES))
        pairs = plan.plan_outputs(listing.paths, FLAGS.output_dir, FLAGS.overwrite)
        if FLAGS.model_dir.endswith(LITERT_SUFFIX):
            model = _load_litert(chosen(FLAGS.max_image_pixels, image_io.DEFAULT_MAX_PIXELS))
        else:
            model = load_comdefend(FLAGS.model_dir,
                                   inference_noise_std=FLAGS.inference_noise_std, seed=FLAGS.seed)
        files.check_settings(model, FLAGS.channel_order, FLAGS.tile_above_pixels,
                             FLAGS.patch_size, FLAGS.overlap)
    except (FileNotFoundError, ValueError) as error:
        print(refusals.error_line(error), file=sys.stderr)
        return exit_codes.COULD_NOT_START
    try:
        os.makedirs(FLAGS.output_dir, exist_ok=True)
    except OSError as error:  # made a file meanwhile, no permission, name too long
        print(refusals.error_line(f"cannot create output folder {FLAGS.output_dir!r}: "
                                  f"{error.strerror or error}"), file=sys.stderr)
        return exit_codes.COULD_NOT_START
    if not files.is_litert(model):
        model = precision.convert_model(model, FLAGS.precision)
    to_uint8 = (parity.truncate_to_uint8 if FLAGS.uint8_conversion == "truncate"
                else image_io.to_uint8)
    summary = files.purify_files(
        model, pairs, patch_size=FLAGS.patch_size, overlap=FLAGS.overlap,
        channel_order=FLAGS.channel_order, batch_size=FLAGS.batch_size, to_uint8=to_uint8,
        progress=FLAGS.progress, tile_above_pixels=FLAGS.tile_above_pixels,
        max_image_pixels=chosen(FLAGS.max_image_pixels, image_io.DEFAULT_MAX_PIXELS),
        max_file_bytes=chosen(FLAGS.max_file_bytes, image_io.DEFAULT_MAX_BYTES),
        refused=listing.refused, overwrite=FLAGS.overwrite)
    print(summary.line())
    if summary.failures:
        print(f"{len(summary.failures)} input(s) refused:", file=sys.stderr)
        for line in summary.refusals():
            print(f"  {line}", file=sys.stderr)
        return exit_codes.SOME_REFUSED
    return exit_codes.OK


def main():
    """Console-script entry point (``comdefend-purify``)."""
    app.run(_main)


if __name__ == "__main__":
    main()
