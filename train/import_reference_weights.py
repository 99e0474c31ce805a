r"""Imports the authors' released ComDefend weights into a model directory.

Reads the two released files with ``comdefend_tf.weights.importer``'s safe reader (its own zip
and pickle parsing: nothing in a file can run code, crash the process or allocate beyond a fixed
cap; a refused file ends with ``error: ...`` and exit status 1), infers the architecture from
their shapes (RGB ``paper`` widths or the 1-channel ``released_gray`` widths), and writes
``MODEL_DIR/comdefend.keras``, ``config.json`` and
``metrics.json``, the same files the training binary writes, so evaluation, export and the
purify command take an imported model exactly like a trained one. Each file is read once;
``metrics.json`` records the sha256 of the bytes that were loaded (and whether they are one of
the authors' released files), never of a second reading of the path.

    python -m train.import_reference_weights \
        --encoder_weights=/path/to/enc20_0.0001.npy \
        --decoder_weights=/path/to/dec20_0.0001.npy \
        --model_dir=runs/released_rgb
"""

from __future__ import annotations

import datetime
import os
import sys

from absl import app, flags

from comdefend_tf.cli import exit_codes
from comdefend_tf.cli import flags as cli_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("encoder_weights", None,
                    "The released ComCNN file, e.g. enc20_0.0001.npy (RGB) or enc_mnist.npy "
                    "(1 channel): an np.savez_compressed archive named .npy.")
flags.DEFINE_string("decoder_weights", None,
                    "The released ResCNN file, e.g. dec20_0.0001.npy or dec_mnist.npy.")
flags.DEFINE_string("model_dir", None, "Directory to write comdefend.keras, config.json and "
                    "metrics.json into (created if missing).")
cli_flags.define_inference_noise_flag(default=0.0)
flags.adopt_module_key_flags(cli_flags)  # --help lists --inference_noise_std too
flags.DEFINE_enum("inference_mode", None, ["hard", "soft"],
                  "Code path at inference: 'hard' feeds 0/1 bits to ResCNN (the RGB release), "
                  "'soft' feeds sigmoid(logits) (the Fashion-MNIST release). Default: the path "
                  "the authors used for the detected model.")
flags.DEFINE_bool("overwrite", False, "Replace an existing comdefend.keras in --model_dir.")
flags.mark_flags_as_required(["encoder_weights", "decoder_weights", "model_dir"])


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from comdefend_tf import model as model_lib
    from comdefend_tf.weights import importer

    keras_path = os.path.join(FLAGS.model_dir, model_lib.KERAS_FILENAME)
    if os.path.exists(keras_path) and not FLAGS.overwrite:
        print(f"error: {keras_path} already exists; pass --overwrite to replace it",
              file=sys.stderr)
        return exit_codes.COULD_NOT_START
    try:
        model, provenance = importer.load_reference_model(
            FLAGS.encoder_weights, FLAGS.decoder_weights,
            inference_noise_std=FLAGS.inference_noise_std, inference_mode=FLAGS.inference_mode)
    except (importer.ReferenceWeightsError, OSError) as error:
        # ReferenceWeightsError covers every malformed or hostile file (safe_zip and
        # pickle_reader list what is refused); OSError is a missing or unreadable path.
        print(f"error: {error}", file=sys.stderr)
        return exit_codes.COULD_NOT_START
    metrics = {"source": "imported from the authors' released weights",
               "imported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds"),
               **provenance,
               "parameters": provenance["encoder_parameters"] + provenance["decoder_parameters"]}
    model_lib.save_comdefend(model, FLAGS.model_dir, metrics)
    config = model.config
    print(f"wrote {keras_path}: {provenance['architecture']}, {metrics['parameters']:,} "
          f"parameters, {config.input_channels} input channel(s), {config.code_channels} code "
          f"bits per pixel, inference {config.inference_mode} path with noise std "
          f"{config.inference_noise_std:g}")
    for role in ("encoder", "decoder"):
        released = provenance[f"{role}_released_as"]
        print(f"  {role}: sha256 {provenance[f'{role}_sha256'][:16]}... "
              f"{'= ' + released if released else '(not one of the known released files)'}")
    return exit_codes.OK


def main():
    """Console-script entry point."""
    app.run(_main)


if __name__ == "__main__":
    main()
