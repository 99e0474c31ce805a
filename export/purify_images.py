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

import dataclasses
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np
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


class OutputPlanError(ValueError):
    """The requested outputs would overwrite files, collide, or land in an input folder."""


def plan_outputs(input_paths: Sequence[str], output_dir: str,
                 overwrite: bool = False) -> list[tuple[str, str]]:
    """Pairs each input with ``OUTPUT_DIR/<stem>.png`` after checking the plan is safe.

    Raises:
      OutputPlanError: ``output_dir`` holds an input image, two inputs share an output name,
        or (without ``overwrite``) an output file already exists. Nothing has been written.
    """
    output_real = os.path.realpath(output_dir)
    input_folders = {os.path.realpath(os.path.dirname(os.path.abspath(p))) for p in input_paths}
    if output_real in input_folders:
        raise OutputPlanError(f"--output_dir {output_dir!r} holds input images; choose another "
                              f"folder (this command never writes into an input folder)")
    pairs, claimed = [], {}
    for path in input_paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        target = os.path.join(output_dir, stem + ".png")
        if target in claimed:
            raise OutputPlanError(f"{claimed[target]!r} and {path!r} would both be written to "
                                  f"{target!r}; purify them into different folders")
        claimed[target] = path
        pairs.append((path, target))
    if not overwrite:
        existing = [target for _, target in pairs if os.path.exists(target)]
        if existing:
            raise OutputPlanError(f"{len(existing)} output file(s) already exist (first: "
                                  f"{existing[0]!r}); pass --overwrite to replace them")
    return pairs


def purify_array(model, image: np.ndarray, patch_size: int = 0, overlap: int = 0,
                 channel_order: str = "rgb", batch_size: int = 64) -> np.ndarray:
    """Purifies one image.

    Args:
      model: a ``ComDefend`` (any callable from ``[n, h, w, c]`` to the same shape).
      image: float32 ``[height, width, channels]`` in [0, 1], RGB order for 3 channels.
      patch_size: tile side in pixels, 0 for the whole image at once.
      overlap: context pixels per tile side (see ``comdefend_tf.patches``).
      channel_order: ``rgb`` or ``bgr`` (channels reversed into and out of the network).
      batch_size: tiles per network call.

    Returns:
      float32 ``[height, width, channels]`` in (0, 1), in the input's (RGB) order.
    """
    from keras import ops

    from comdefend_tf.patches import purify_patchwise

    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"channel_order must be rgb or bgr, got {channel_order!r}")
    network_input = image[..., ::-1] if channel_order == "bgr" else image
    batch = np.ascontiguousarray(network_input[None], dtype=np.float32)
    if patch_size:
        purified = purify_patchwise(lambda tiles: model(tiles, training=False), batch,
                                    patch_size=patch_size, overlap=overlap, batch_size=batch_size)
    else:
        purified = model(batch, training=False)
    purified = np.asarray(ops.convert_to_numpy(ops.cast(purified, "float32")))[0]
    return purified[..., ::-1] if channel_order == "bgr" else purified


@dataclasses.dataclass
class PurifySummary:
    """What one run did: written outputs, failures (path, message), timing and PSNRs (dB)."""

    written: list[str] = dataclasses.field(default_factory=list)
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    psnr_db: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        finite = [p for p in self.psnr_db if np.isfinite(p)]
        mean_psnr = f"{np.mean(finite):.2f} dB" if finite else "n/a"
        failed = f", {len(self.failures)} failed" if self.failures else ""
        return (f"purified {len(self.written)} image(s) in {self.seconds:.1f} s{failed}; "
                f"mean PSNR of output vs input {mean_psnr}")


def purify_files(model, pairs: Sequence[tuple[str, str]], patch_size: int = 0, overlap: int = 0,
                 channel_order: str = "rgb", batch_size: int = 64,
                 to_uint8: Callable[[np.ndarray], np.ndarray] | None = None,
                 progress: bool = True, on_error: Callable[[str], None] | None = None
                 ) -> PurifySummary:
    """Reads, purifies and writes each ``(input_path, output_path)`` pair.

    Unreadable inputs are recorded in ``summary.failures`` (and passed to ``on_error``) and
    skipped; every other image is written. ``to_uint8`` converts float outputs to uint8
    (default: rounding). PSNR is of the written uint8 output against the input (0..1 scale).
    """
    from tqdm import tqdm

    from comdefend_tf import image_io

    to_uint8 = to_uint8 or image_io.to_uint8
    channels = model.config.input_channels
    summary = PurifySummary()
    start = time.perf_counter()
    for source, target in tqdm(pairs, desc="purify", unit="image", disable=not progress,
                               file=sys.stderr):
        try:
            image = image_io.read_image(source, channels=channels)
        except (image_io.ImageReadError, OSError) as error:
            summary.failures.append((source, str(error)))
            if on_error:
                on_error(str(error))
            continue
        purified = purify_array(model, image, patch_size, overlap, channel_order, batch_size)
        output = to_uint8(purified)
        image_io.write_png(target, output)
        summary.written.append(target)
        summary.psnr_db.append(image_io.psnr_db(image, output.astype(np.float32) / 255.0))
    summary.seconds = time.perf_counter() - start
    return summary


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from comdefend_tf import image_io, precision, reference
    from comdefend_tf.model import load_comdefend

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
