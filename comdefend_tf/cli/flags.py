"""Every flag shared by more than one binary, defined once: one name, one help text, one set of
choices and bounds. A binary calls the definers it needs at import time, before it reads
``flags.FLAGS``. This module disclaims the flags it defines, so they are key flags of the
binary that called the definer and its ``--help`` lists them.

Per-binary differences are parameters, never a second definition: a default
(``define_inference_noise_flag(default=0.0)``), the precisions a binary offers
(``define_precision_flag(choices=("float32", "bfloat16"))``), the training epochs and batch
size, the distribution strategies. Defining one flag twice raises absl's
``flags.DuplicateFlagError``. Every definer takes ``flag_values`` (default: absl's global
``flags.FLAGS``) so tests can define into a fresh ``flags.FlagValues()``.
"""

from __future__ import annotations

import sys

from absl import flags

from comdefend_tf import optional
from comdefend_tf.io import datasets as data_lib
from comdefend_tf.training import precision as precision_lib

# The flags defined below belong to the module that called the definer (its --help lists them).
flags.disclaim_key_flags()

# Bounds of the baseline defenses' settings; comdefend_tf.evaluation.baselines refuses values
# outside them with ValueError, the flags refuse them before any work.
JPEG_QUALITY_BOUNDS = (1, 100)
BIT_DEPTH_BOUNDS = (1, 8)
MEDIAN_SIZE_BOUNDS = (1, 15)

# The saved-model flags, by name: what each holds. load_comdefend and load_classifier take a
# model directory or the .keras file itself.
MODEL_DIR_HELP = {
    "classifier_dir": "Directory holding classifier.keras (python -m train.train_classifier), "
                      "or the .keras file itself: the classifier to defend.",
    "comdefend_dir": "Directory holding comdefend.keras (python -m train.train_comdefend or "
                     "train.import_reference_weights), or the .keras file itself.",
    "purified_classifier_dir": "A classifier trained behind --comdefend_dir (python -m "
                               "train.train_classifier --purifier_dir): adds the defense "
                               "comdefend_train_test (the paper's training-and-test-time mode) "
                               "beside comdefend (test time).",
}

INFERENCE_NOISE_HELP = (
    "Standard deviation of the Gaussian noise on the code logits at inference (0: deterministic "
    "purification; the released models ran with 1.0, which flips about 0.2 % of the RGB "
    "model's code bits and about 7 % of the 1-channel model's). Unset: the model's own setting.")

PRECISION_HELP = (
    "Compute precision of the purifier. float32: the reference. bfloat16: Keras "
    "mixed_bfloat16 (float32 weights, code logits and outputs; bf16 convolutions), faster on "
    "CPUs/GPUs with bf16 units, outputs differ by a few grey levels. auto, where offered: "
    "bfloat16 only on bf16 hardware and, when there are images to check, only if the bf16 "
    "quality check passes; float32 otherwise.")


IMAGE_SIZE_HELP = "Resize every image to HEIGHT,WIDTH pixels (default: the images' own size)."


def define_image_size_flag(help_text: str = IMAGE_SIZE_HELP, *,
                           flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines --image_size (HEIGHT,WIDTH; ``parse_image_size`` reads it)."""
    flags.DEFINE_list("image_size", None, help_text, flag_values=flag_values)


def parse_image_size(values) -> tuple[int, int] | None:
    """``(height, width)`` from --image_size's list, None when unset.

    Raises:
      ValueError: not two positive integers (the message names the flag).
    """
    if not values:
        return None
    try:
        height, width = (int(value) for value in values)
    except ValueError:
        raise ValueError(f"--image_size must be HEIGHT,WIDTH integers, got "
                         f"{','.join(values)!r}") from None
    if min(height, width) < 1:
        raise ValueError(f"--image_size must be HEIGHT,WIDTH positive integers, got "
                         f"{height},{width}")
    return height, width


def define_data_flags(default_dataset: str = "mnist5k", *,
                      flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines --dataset, --image_size, --color_mode, --data_dir and --manual_dir."""
    flags.DEFINE_string(
        "dataset", default_dataset,
        f"Image source: one of {', '.join(data_lib.source_names())}. The embedded sets need no "
        "download; they and the tensorflow-datasets names need the [data] extra (pip install "
        "'comdefend-tf[data]'). folder:PATH reads PATH/<class>/<image>.png|jpg.",
        flag_values=flag_values)
    define_image_size_flag(flag_values=flag_values)
    flags.DEFINE_enum("color_mode", None, sorted(data_lib.COLOR_MODES),
                      "Convert images to this many channels (default: the source's own).",
                      flag_values=flag_values)
    flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.",
                        flag_values=flag_values)
    flags.DEFINE_string("manual_dir", None,
                        "tensorflow-datasets manual download directory (imagenet2012).",
                        flag_values=flag_values)


def load_data_from_flags(split_seed: int = 0, *,
                         flag_values: flags.FlagValues = flags.FLAGS) -> data_lib.ImageData:
    """Opens the dataset the (parsed) data flags name.

    Raises:
      flags.ValidationError: --image_size is not two integers.
      datasets.DataError: bad data.
      SystemExit: status 1 and one line naming the pip extra, when the source needs one.
    """
    try:
        image_size = parse_image_size(flag_values.image_size)
    except ValueError as error:
        raise flags.ValidationError(str(error)) from error
    try:
        return data_lib.load_dataset(flag_values.dataset, image_size=image_size,
                                     color_mode=flag_values.color_mode, split_seed=split_seed,
                                     data_dir=flag_values.data_dir,
                                     manual_dir=flag_values.manual_dir)
    except optional.MissingExtra as error:
        sys.exit(f"error: {error}")


def define_inference_noise_flag(default: float | None = None, *,
                                flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines --inference_noise_std (>= 0); ``None`` means the model's own setting."""
    flags.DEFINE_float("inference_noise_std", default, INFERENCE_NOISE_HELP, lower_bound=0.0,
                       flag_values=flag_values)


def define_precision_flag(choices=precision_lib.PRECISIONS, default: str = "float32", *,
                          flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines --precision with the ``choices`` (a subset of ``precision.PRECISIONS``) this
    binary offers.

    Raises:
      ValueError: a choice or the default is not a known precision.
    """
    choices = tuple(choices)
    unknown = [name for name in choices if name not in precision_lib.PRECISIONS]
    if unknown or not choices:
        raise ValueError(f"precision choices must be a non-empty subset of "
                         f"{precision_lib.PRECISIONS}, got {choices}")
    if default not in choices:
        raise ValueError(f"default precision {default!r} is not among {choices}")
    flags.DEFINE_enum("precision", default, list(choices), PRECISION_HELP,
                      flag_values=flag_values)


def define_baseline_flags(*, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines --jpeg_quality, --bit_depth and --median_size, the settings of the baseline
    input defenses (comdefend_tf.evaluation.baselines), with the bounds the defenses accept."""
    flags.DEFINE_integer("jpeg_quality", 75, "JPEG baseline: re-encoding quality (lower removes "
                         "more).", lower_bound=JPEG_QUALITY_BOUNDS[0],
                         upper_bound=JPEG_QUALITY_BOUNDS[1], flag_values=flag_values)
    flags.DEFINE_integer("bit_depth", 4, "Bit-depth baseline: bits kept per channel (Xu et al. "
                         "use 1 for MNIST).", lower_bound=BIT_DEPTH_BOUNDS[0],
                         upper_bound=BIT_DEPTH_BOUNDS[1], flag_values=flag_values)
    flags.DEFINE_integer("median_size", 3, "Median-filter baseline: window side in pixels.",
                         lower_bound=MEDIAN_SIZE_BOUNDS[0], upper_bound=MEDIAN_SIZE_BOUNDS[1],
                         flag_values=flag_values)


def define_model_dir_flags(*names: str, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the named saved-model flags (keys of ``MODEL_DIR_HELP``), each default None.

    Raises:
      ValueError: an unknown name.
    """
    unknown = [name for name in names if name not in MODEL_DIR_HELP]
    if unknown:
        raise ValueError(f"unknown model flag(s) {unknown}; known: {sorted(MODEL_DIR_HELP)}")
    for name in names:
        flags.DEFINE_string(name, None, MODEL_DIR_HELP[name], flag_values=flag_values)


def define_training_run_flags(epochs: int, batch_size: int, strategies,
                              checkpoint_every_steps: int, *,
                              flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the flags of a training run: --epochs, --batch_size, --steps_per_epoch,
    --learning_rate, --model_dir (output, resumed), --strategy (one of ``strategies``), --seed
    and --checkpoint_every_steps, with this binary's defaults."""
    flags.DEFINE_integer("epochs", epochs, "Passes over the training images.", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer("batch_size", batch_size, "Global batch size in images.", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer("steps_per_epoch", None, "Cap on optimizer steps per epoch "
                         "(default: one full pass).", lower_bound=1, flag_values=flag_values)
    flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.", lower_bound=0,
                       flag_values=flag_values)
    flags.DEFINE_string("model_dir", None,
                        "Output directory (resumed if it holds an unfinished run).",
                        flag_values=flag_values)
    flags.DEFINE_enum("strategy", "default", list(strategies),
                      "tf.distribute strategy; multi_worker, where offered, reads TF_CONFIG.",
                      flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "Seed for initialisation, the data order and, for "
                         "ComDefend, the code noise.", flag_values=flag_values)
    flags.DEFINE_integer("checkpoint_every_steps", checkpoint_every_steps,
                         "Optimizer steps between checkpoints in MODEL_DIR/backup, which are "
                         "also written at every epoch end; a kill loses at most this many steps.",
                         lower_bound=1, flag_values=flag_values)


def define_file_limit_flags(*, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the limits of the commands that purify files, checked before any decoding:
    --max_image_pixels, --max_file_bytes, --max_files and --tile_above_pixels (each default
    None: the library's default)."""
    flags.DEFINE_integer("max_image_pixels", None, "Refuse (too_large) images declaring more "
                         "pixels (height x width) than this, read from the header before "
                         "decoding. Default: comdefend_tf.io.images.DEFAULT_MAX_PIXELS "
                         "(100,000,000).", lower_bound=1, flag_values=flag_values)
    flags.DEFINE_integer("max_file_bytes", None, "Refuse (too_large) input files larger than "
                         "this many bytes, before reading them. Default: "
                         "comdefend_tf.io.images.DEFAULT_MAX_BYTES (536,870,912 = 512 MiB).",
                         lower_bound=1, flag_values=flag_values)
    flags.DEFINE_integer("max_files", None, "Stop before any work if --input matches more files "
                         "than this (the list of names is held in memory, about 0.3 KB per "
                         "file). Default: comdefend_tf.io.listing.DEFAULT_MAX_FILES "
                         "(1,000,000).", lower_bound=1, flag_values=flag_values)
    flags.DEFINE_integer("tile_above_pixels", None, "Pixel budget of whole-image purification "
                         "with a Keras model: larger images (height x width) are purified in "
                         "tiles with the receptive-field radius as overlap, exactly equal to the "
                         "whole-image result, at most this many window pixels per network call. "
                         "Default: 2 GiB of activations over the model's estimated bytes per "
                         "pixel (about 590x590 for the paper widths). 0: never tile.",
                         lower_bound=0, flag_values=flag_values)
