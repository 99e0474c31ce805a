r"""Purifies a whole dataset with Apache Beam: image folder, TFRecords or tfds in, TFRecords out.

    python -m export.purify_dataset --model_dir=runs/demo/comdefend \
        --input=images/ --output_dir=purified/ \
        --runner=FnApiRunner --direct_running_mode=multi_processing --direct_num_workers=2

``--input``: an image folder (class subfolders become labels), a quoted glob, ``tfrecord:GLOB``
(``tf.train.Example`` with ``image/encoded`` and ``image/class/label``) or ``tfds:NAME`` (a
prepared tensorflow-datasets dataset; never downloaded). The model is ``--model_dir`` (a
training model directory holding comdefend.keras) or ``--saved_model_dir`` (an export version
folder; its ``purify`` signature). ``--output_dir`` (empty, or a previous run's with
``--overwrite``) receives ``purified-SSSSS-of-NNNNN.tfrecord`` (``tf.train.Example``: purified
PNG, label, source key, optionally the code bits), ``dead_letter-*.jsonl`` (key and reason of
every refused input) and, last, ``manifest.json``; with ``--write_pngs`` also ``pngs/``
mirroring the input tree. Train on the result with ``--dataset=tfrecord:OUTPUT_DIR/purified-*``.

Flags this program does not define are Beam pipeline options (``--runner``,
``--direct_num_workers``, ``--project``...). Without ``--runner`` (or with ``DirectRunner``,
which first tries to download the Prism runner) the pipeline runs on ``FnApiRunner``. Cluster
invocations (Dataflow, Flink, Spark): docs/beam.md. Exit status 0 when every input was
purified; 1 when the run could not start (flags, inputs, model, output folder; nothing written);
2 when it finished but some inputs were refused (each named in the dead letters).
"""

from __future__ import annotations

import sys

from absl import app, flags

from comdefend_tf.cli import exit_codes
from comdefend_tf.cli import flags as shared_flags

FLAGS = flags.FLAGS
shared_flags.define_inference_noise_flag()
flags.DEFINE_string("input", None, "Image folder, quoted glob ('photos/*/*.png'), "
                    "tfrecord:GLOB or tfds:NAME.")
flags.DEFINE_string("output_dir", None, "Folder for the TFRecords, dead letters and manifest; "
                    "must be empty unless --overwrite.")
flags.DEFINE_string("model_dir", None, "Training model directory holding comdefend.keras "
                    "(or a .keras file).")
flags.DEFINE_string("saved_model_dir", None, "Export version folder (export_savedmodel's "
                    "EXPORT_BASE/VERSION); its 'purify' signature is used.")
flags.DEFINE_integer("batch_size", 32, "Images of one size per network call (memory grows "
                     "with it and the image size).", lower_bound=1)
flags.DEFINE_integer("num_shards", 0, "Output TFRecord shards (0: the runner decides).",
                     lower_bound=0)
shared_flags.define_file_limit_flags()
# The names this command had before the limits were shared with the purify command.
flags.DEFINE_alias("max_pixels", "max_image_pixels")
flags.DEFINE_alias("max_bytes", "max_file_bytes")
flags.DEFINE_integer("seed", None, "Seed of the code noise (--model_dir only). Every worker "
                     "replays the same draws.")
flags.DEFINE_bool("code_bits", False, "Also store each image's code bits (packed) in its "
                  "example.")
flags.DEFINE_bool("write_pngs", False, "Also write OUTPUT_DIR/pngs/ mirroring the input tree "
                  "(folder and glob inputs).")
flags.DEFINE_bool("overwrite", False, "Replace a previous run's outputs in --output_dir.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory (tfds: inputs).")
flags.DEFINE_string("tfds_split", "train", "Split of a tfds: input.")
flags.DEFINE_enum("beam_log_level", "error", ["debug", "info", "warning", "error"],
                  "Level of Beam's log lines in this process (the local runner relays the "
                  "workers' warnings; the worker processes' own start and stop lines still "
                  "print at INFO).")
flags.mark_flags_as_required(["input", "output_dir"])


def parse_flags(argv):
    """Parses our flags and returns the rest (Beam pipeline options) after the program name."""
    return FLAGS(argv, known_only=True)


def _main(argv):
    import logging

    from comdefend_tf import optional
    from comdefend_tf.purification import refusals

    try:
        from comdefend_tf.purification import outputs, pipeline
    except optional.MissingExtra as error:  # one line naming the [beam] extra
        print(refusals.error_line(error), file=sys.stderr)
        return exit_codes.COULD_NOT_START

    logging.getLogger("apache_beam").setLevel(FLAGS.beam_log_level.upper())

    pipeline_args = argv[1:]
    settings = {"max_pixels": FLAGS.max_image_pixels, "max_bytes": FLAGS.max_file_bytes,
                "max_files": FLAGS.max_files, "tile_above_pixels": FLAGS.tile_above_pixels}
    try:
        options = pipeline.PurifyOptions(
            input=FLAGS.input, output_dir=FLAGS.output_dir, model_dir=FLAGS.model_dir,
            saved_model_dir=FLAGS.saved_model_dir, batch_size=FLAGS.batch_size,
            num_shards=FLAGS.num_shards, inference_noise_std=FLAGS.inference_noise_std,
            seed=FLAGS.seed, include_code_bits=FLAGS.code_bits, write_pngs=FLAGS.write_pngs,
            overwrite=FLAGS.overwrite, data_dir=FLAGS.data_dir, tfds_split=FLAGS.tfds_split,
            **{key: value for key, value in settings.items() if value is not None})
        manifest = pipeline.run_purify_pipeline(options, pipeline_args)
    except (pipeline.PurifyPipelineError, FileNotFoundError) as error:
        print(refusals.error_line(error), file=sys.stderr)
        return exit_codes.COULD_NOT_START
    reasons = ", ".join(f"{count} {reason}" for reason, count
                        in manifest["refused_by_reason"].items() if count)
    print(f"inputs {manifest['inputs']}, purified {manifest['purified']}, refused "
          f"{manifest['refused']}{f' ({reasons})' if reasons else ''}; "
          f"{manifest['input_bytes']} bytes in, {manifest['output_bytes']} bytes out, "
          f"{manifest['seconds']:.1f} s on {manifest['runner']}; manifest "
          f"{FLAGS.output_dir}/{outputs.MANIFEST_FILENAME}")
    return exit_codes.SOME_REFUSED if manifest["refused"] else exit_codes.OK


def main():
    """Console-script entry point."""
    app.run(_main, flags_parser=parse_flags)


if __name__ == "__main__":
    main()
