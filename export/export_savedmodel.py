r"""Exports a trained ComDefend (and optionally a classifier behind it) for TF Serving.

    python -m export.export_savedmodel --comdefend_dir=runs/comdefend \
        --classifier_dir=runs/classifier --export_base=/abs/path/exports/comdefend

Writes ``EXPORT_BASE/VERSION/`` (a SavedModel in the layout TF Serving watches) atomically:
built in a hidden temporary folder beside it, flushed to disk and renamed into place (the hidden
folders of exports that were killed are removed by the next export). ``--version`` defaults to
one more than the highest existing version; an existing version is only replaced with
``--overwrite``. Signatures: ``purify`` (float images), ``purify_bytes`` (PNG/JPEG bytes),
``classify`` (with ``--classifier_dir``) and ``serving_default`` (``classify`` if present, else
``purify``); see docs/serving.md. Prints the export path and the commands to try it next.
"""

from __future__ import annotations

import sys

from absl import app, flags

from comdefend_tf.training.precision import PRECISIONS

flags.DEFINE_enum("precision", "float32", PRECISIONS,
                  "Compute precision of the served purifier: float32, bfloat16 (Keras "
                  "mixed_bfloat16; float32 inputs and outputs) or auto (float32 here: the "
                  "export has no images to run the bf16 quality check on).")

FLAGS = flags.FLAGS
flags.DEFINE_string("comdefend_dir", None, "Model directory holding comdefend.keras (from "
                    "train.train_comdefend or train.import_reference_weights), or a .keras file.")
flags.DEFINE_string("classifier_dir", None, "Optional model directory holding classifier.keras "
                    "(from train.train_classifier), or a .keras file. Adds the 'classify' "
                    "signature and makes it serving_default.")
flags.DEFINE_string("export_base", None, "Folder TF Serving's --model_base_path points at; "
                    "versions are written as numbered subfolders.")
flags.DEFINE_integer("version", None, "Version number to write (default: one more than the "
                     "highest existing version, 1 for a new folder).", lower_bound=1)
flags.DEFINE_bool("overwrite", False, "Replace the version folder if it already exists.")
flags.DEFINE_float("inference_noise_std", None, "Standard deviation of the code noise in the "
                   "served graph (0: deterministic; the release used 1.0). Default: the "
                   "model's own setting.", lower_bound=0.0)
flags.DEFINE_integer("noise_seed", None, "Seed of the served noise (only with noise). Default: "
                     "none, and every process that loads the export seeds its noise from the "
                     "OS's entropy, so the draws cannot be predicted from the files. With a "
                     "seed every process replays the same draws: reproducible, and predictable "
                     "by anyone holding the export (tests and audits only).", lower_bound=0)
flags.DEFINE_integer("patch_size", None, "Images are purified in tiles of this many pixels "
                     "inside the graph (bounds server memory). Default: the library's "
                     "ExportSettings.patch_size.", lower_bound=1)
flags.DEFINE_integer("patch_overlap", None, "Context pixels around each tile, purified and "
                     "discarded. Default: the network's receptive field radius, with which "
                     "tiled output equals whole-image output; 0 gives seams.", lower_bound=0)
flags.DEFINE_integer("patch_batch_size", None, "Tiles per network call inside the graph "
                     "(peak memory grows with it). Default: the library's.", lower_bound=1)
flags.DEFINE_integer("max_pixels", None, "Requests with more pixels, summed over their "
                     "images (batch x height x width; for encoded images the sizes their "
                     "headers declare), are refused with InvalidArgumentError. Default: the "
                     "library's ExportSettings.max_pixels (4096 x 4096).", lower_bound=1)
flags.DEFINE_integer("max_batch_size", None, "Requests with more images are refused with "
                     "InvalidArgumentError (every signature). Default: the library's "
                     "ExportSettings.max_batch_size (1024).", lower_bound=1)
flags.DEFINE_enum("classifier_outputs", None, ["auto", "logits", "probabilities"], "What the "
                  "classifier's last layer emits; 'auto' treats a softmax last layer as "
                  "probabilities and anything else as logits. Default: auto.")
flags.mark_flags_as_required(["comdefend_dir", "export_base"])


def settings_from_flags():
    """ExportSettings with only the flags the user set (library defaults for the rest)."""
    from comdefend_tf.serving import signatures as serving

    given = {name: getattr(FLAGS, name) for name in (
        "inference_noise_std", "noise_seed", "patch_size", "patch_overlap", "patch_batch_size",
        "max_pixels", "max_batch_size", "classifier_outputs")
        if getattr(FLAGS, name) is not None}
    return serving.ExportSettings(**given)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import warnings

    from comdefend_tf import model as model_lib
    from comdefend_tf.training import classifier as classifiers
    from comdefend_tf.training import precision
    from comdefend_tf.training import provenance
    from comdefend_tf.serving import signatures as serving

    try:
        settings = settings_from_flags()
        purifier = model_lib.load_comdefend(FLAGS.comdefend_dir)
        purifier = precision.select_for_inference(purifier, FLAGS.precision).model
        classifier = (classifiers.load_classifier(FLAGS.classifier_dir)
                      if FLAGS.classifier_dir else None)
        record = (provenance.read_classifier_purifier(FLAGS.classifier_dir)
                  if FLAGS.classifier_dir else None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", provenance.PurifierMismatchWarning)
            version_dir = serving.export_savedmodel(
                purifier, FLAGS.export_base, classifier=classifier, settings=settings,
                version=FLAGS.version, overwrite=FLAGS.overwrite, classifier_record=record,
                purifier_path=FLAGS.comdefend_dir)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"export_savedmodel: {error}", file=sys.stderr)
        return 1

    signatures = ([serving.SIGNATURE_CLASSIFY] if classifier is not None else []) + [
        serving.SIGNATURE_PURIFY, serving.SIGNATURE_PURIFY_BYTES]
    height_width = (serving.classifier_height_width(classifier) if classifier is not None
                    else None)
    commands = serving.next_step_commands(version_dir, purifier.config.input_channels,
                                          height_width or (32, 32))
    if settings.noise_seed is not None:
        print(f"Warning: --noise_seed={settings.noise_seed} makes the served noise reproducible "
              "in every process that loads this export, hence predictable by anyone who has "
              "it; export without --noise_seed for production.", file=sys.stderr)
    for warning in caught:
        if issubclass(warning.category, provenance.PurifierMismatchWarning):
            print(f"Warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename,
                                 warning.lineno)
    mode = ("purify only" if classifier is None else
            provenance.defense_mode(record, purifier).replace("_", " "))
    print(f"Exported SavedModel: {version_dir} (defense mode: {mode})")
    print(f"Signatures: {', '.join(signatures)}; serving_default = {signatures[0]}")
    print(f"Inspect it:  {commands['show']}")
    print(f"Run it:      {commands['sample']} && {commands['run']}")
    print(f"Serve it:    {commands['serve']}")
    return 0


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
