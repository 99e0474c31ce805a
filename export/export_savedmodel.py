r"""Exports a trained ComDefend (and optionally a classifier behind it) for TF Serving.

    python -m export.export_savedmodel --comdefend_dir=runs/comdefend \
        --classifier_dir=runs/classifier --export_base=/abs/path/exports/comdefend

Writes ``EXPORT_BASE/VERSION/`` (a SavedModel in the layout TF Serving watches) atomically:
built in a hidden temporary folder beside it, flushed to disk and renamed into place (the hidden
folders of exports that were killed are removed by the next export). ``--version`` defaults to
one more than the highest existing version; an existing version is only replaced with
``--overwrite``. Signatures: ``purify`` (float images), ``purify_bytes`` (PNG/JPEG bytes),
``purify_examples`` (tf.Example), ``classify`` (with ``--classifier_dir``) and
``serving_default`` (``classify`` if present, else ``purify``); see docs/serving.md. Prints the
export path and the commands to try it next.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from comdefend_tf.cli import exit_codes
from comdefend_tf.cli import flags as shared_flags
from comdefend_tf.serving.settings import CLASSIFIER_OUTPUTS, ExportSettings

FLAGS = flags.FLAGS
shared_flags.define_precision_flag()
shared_flags.define_model_dir_flags("comdefend_dir", "classifier_dir")
shared_flags.define_inference_noise_flag()
flags.DEFINE_string("export_base", None, "Folder TF Serving's --model_base_path points at; "
                    "versions are written as numbered subfolders.")
flags.DEFINE_integer("version", None, "Version number to write (default: one more than the "
                     "highest existing version, 1 for a new folder).", lower_bound=1)
flags.DEFINE_bool("overwrite", False, "Replace the version folder if it already exists.")
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
flags.DEFINE_enum("classifier_outputs", None, list(CLASSIFIER_OUTPUTS), "What the "
                  "classifier's last layer emits; 'auto' treats a softmax last layer as "
                  "probabilities and anything else as logits. Default: auto.")
flags.mark_flags_as_required(["comdefend_dir", "export_base"])


def settings_from_flags() -> ExportSettings:
    """ExportSettings with only the flags the user set (library defaults for the rest)."""
    given = {name: getattr(FLAGS, name) for name in (
        "inference_noise_std", "noise_seed", "patch_size", "patch_overlap", "patch_batch_size",
        "max_pixels", "max_batch_size", "classifier_outputs")
        if getattr(FLAGS, name) is not None}
    return ExportSettings(**given)


def next_step_commands(version_dir: str, channels: int,
                       height_width: tuple[int, int] = (32, 32)) -> dict:
    """Shell lines a user can run next on an exported version, keyed ``show``, ``sample``,
    ``run`` and ``serve`` (the sample writes ``images.npy``: float32 ``[1, H, W, C]`` in [0, 1];
    ``saved_model_cli run --input_exprs`` takes only Python literals, so arrays go in as .npy)."""
    from comdefend_tf.serving.signatures import INPUT_IMAGES, SIGNATURE_DEFAULT

    height, width = height_width
    export_base = os.path.dirname(os.path.abspath(version_dir))
    return {
        "show": f"saved_model_cli show --all --dir {version_dir}",
        "sample": ('python -c "import numpy as np; np.save(\'images.npy\', np.random.rand('
                   f'1, {height}, {width}, {channels}).astype(\'float32\'))"'),
        "run": (f"saved_model_cli run --dir {version_dir} --tag_set serve --signature_def "
                f"{SIGNATURE_DEFAULT} --inputs {INPUT_IMAGES}=images.npy"),
        "serve": (f"tensorflow_model_server --rest_api_port=8501 --model_name=comdefend "
                  f"--model_base_path={export_base}"),
    }


def _print_warnings(caught, settings: ExportSettings) -> None:
    import warnings

    from comdefend_tf.training import provenance

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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import warnings

    from comdefend_tf import model as model_lib
    from comdefend_tf.serving import classifier_spec, export
    from comdefend_tf.serving import signatures as names
    from comdefend_tf.training import classifier as classifier_lib
    from comdefend_tf.training import precision, provenance

    try:
        settings = settings_from_flags()
        purifier = model_lib.load_comdefend(FLAGS.comdefend_dir)
        purifier = precision.select_for_inference(purifier, FLAGS.precision).model
        classifier = (classifier_lib.load_classifier(FLAGS.classifier_dir)
                      if FLAGS.classifier_dir else None)
        record = (provenance.read_classifier_purifier(FLAGS.classifier_dir)
                  if FLAGS.classifier_dir else None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", provenance.PurifierMismatchWarning)
            version_dir = export.export_savedmodel(
                purifier, FLAGS.export_base, classifier=classifier, settings=settings,
                version=FLAGS.version, overwrite=FLAGS.overwrite, classifier_record=record,
                purifier_path=FLAGS.comdefend_dir,
                adversarial_record=(provenance.adversarial_record(FLAGS.classifier_dir)
                                    if FLAGS.classifier_dir else None))
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"export_savedmodel: {error}", file=sys.stderr)
        return exit_codes.COULD_NOT_START

    signatures = ([names.SIGNATURE_CLASSIFY] if classifier is not None else []) + [
        names.SIGNATURE_PURIFY, names.SIGNATURE_PURIFY_BYTES]
    height_width = (classifier_spec.classifier_height_width(classifier)
                    if classifier is not None else None)
    commands = next_step_commands(version_dir, purifier.config.input_channels,
                                  height_width or (32, 32))
    _print_warnings(caught, settings)
    mode = ("purify only" if classifier is None else
            provenance.defense_mode(record, purifier).replace("_", " "))
    print(f"Exported SavedModel: {version_dir} (defense mode: {mode})")
    print(f"Signatures: {', '.join(signatures)}; serving_default = {signatures[0]}")
    print(f"Inspect it:  {commands['show']}")
    print(f"Run it:      {commands['sample']} && {commands['run']}")
    print(f"Serve it:    {commands['serve']}")
    return exit_codes.OK


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
