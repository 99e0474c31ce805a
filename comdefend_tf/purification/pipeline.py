"""Purifying a whole dataset with Apache Beam: the request, the pipeline, the run and its manifest.

``run_purify_pipeline(PurifyOptions, pipeline_args)`` checks the whole request first (Beam
options, inputs through ``plan.plan_inputs``, unique PNG names, the model's metadata and an
export's request limits, an empty output folder) and raises ``PurifyPipelineError`` with
nothing written; then it reads, checks and decodes (``sources``), batches by shape within the
export's limits, purifies with ``RunInference`` (``handler``), writes (``outputs``) and, last,
``manifest.json``: counts (every input purified or dead-lettered: one bad file, record or image
the model refuses is a dead letter, never the end of the run), bytes, seconds, the request.
Runs locally on the FnApiRunner and unchanged on a cluster runner
(docs/beam.md; history and measurements: docs/internals/purification.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import NamedTuple, Sequence

from comdefend_tf import optional
from comdefend_tf.io import images as image_io
from comdefend_tf.io.examples import to_example
from comdefend_tf.purification import counters, outputs, plan, refusals
from comdefend_tf.purification.handler import (ExportLimits, PurifierModelHandler,
                                               read_export_limits)
from comdefend_tf.purification.sources import DecodeImages, ReadSourceImages, shape_key

beam = optional.require("apache_beam", "beam", "dataset purification on Apache Beam")
from apache_beam.io.filesystems import FileSystems  # noqa: E402
from apache_beam.ml.inference.base import RunInference  # noqa: E402


class PurifyPipelineError(ValueError):
    """A bad pipeline request: no inputs, an output folder in use, a missing model."""


@dataclasses.dataclass(frozen=True)
class PurifyOptions:
    """Settings of one pipeline run (the binary's flags; see ``export/purify_dataset.py``)."""

    input: str
    output_dir: str
    model_dir: str | None = None
    saved_model_dir: str | None = None
    batch_size: int = 32
    num_shards: int = 0
    max_pixels: int = image_io.DEFAULT_MAX_PIXELS
    max_bytes: int = image_io.DEFAULT_MAX_BYTES
    max_files: int = plan.DEFAULT_MAX_FILES
    tile_above_pixels: int | None = None
    inference_noise_std: float | None = None
    seed: int | None = None
    include_code_bits: bool = False
    write_pngs: bool = False
    overwrite: bool = False
    data_dir: str | None = None
    tfds_split: str = "train"

    def __post_init__(self):
        if (self.model_dir is None) == (self.saved_model_dir is None):
            raise PurifyPipelineError("give exactly one of --model_dir and --saved_model_dir")
        for name in ("batch_size", "max_pixels", "max_bytes", "max_files"):
            if getattr(self, name) < 1:
                raise PurifyPipelineError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tile_above_pixels is not None and self.tile_above_pixels < 0:
            raise PurifyPipelineError(f"tile_above_pixels must be >= 0, got "
                                      f"{self.tile_above_pixels}")
        if self.num_shards < 0:
            raise PurifyPipelineError(f"num_shards must be >= 0, got {self.num_shards}")
        if self.saved_model_dir is not None and (self.inference_noise_std is not None
                                                 or self.seed is not None
                                                 or self.tile_above_pixels is not None):
            raise PurifyPipelineError("an exported SavedModel carries its own noise and tiling "
                                      "settings; inference_noise_std, seed and "
                                      "tile_above_pixels apply to --model_dir only")

    def model_handler(self, limits: ExportLimits | None = None) -> PurifierModelHandler:
        if self.saved_model_dir is not None:
            return PurifierModelHandler(saved_model_dir=self.saved_model_dir, limits=limits)
        return PurifierModelHandler(keras_path=self.model_dir,
                                    inference_noise_std=self.inference_noise_std,
                                    seed=self.seed, tile_above_pixels=self.tile_above_pixels)


class ModelInfo(NamedTuple):
    """What the pipeline needs of the model before running it: its input ``channels`` and,
    for an export, its request ``limits`` (None for a Keras model, which tiles itself)."""

    channels: int
    limits: ExportLimits | None = None


def model_info(options: PurifyOptions) -> ModelInfo:
    """The purifier's input channels and an export's request limits, read from the model's
    metadata (no weights loaded).

    Raises:
      PurifyPipelineError: the folder is no export version folder or model directory, or the
        export's metadata has no valid limits.
    """
    from comdefend_tf.config import ComDefendConfig
    from comdefend_tf.model import CONFIG_FILENAME, KERAS_FILENAME
    from comdefend_tf.serving import export as serving_export

    if options.saved_model_dir is not None:
        metadata = FileSystems.join(options.saved_model_dir,
                                    serving_export.EXPORT_METADATA_FILENAME)
        if not FileSystems.exists(metadata):
            raise PurifyPipelineError(f"{options.saved_model_dir!r} is not a comdefend export "
                                      f"version folder (no "
                                      f"{serving_export.EXPORT_METADATA_FILENAME})")
        try:
            metadata = json.loads(outputs.read_text(metadata))
            channels = int(metadata["comdefend_config"]["input_channels"])
            limits = read_export_limits(metadata, repr(options.saved_model_dir))
        except (ValueError, KeyError, TypeError) as error:  # ModelLoadError is a ValueError
            raise PurifyPipelineError(f"{options.saved_model_dir!r}: unusable "
                                      f"{serving_export.EXPORT_METADATA_FILENAME}: "
                                      f"{error}") from error
        return ModelInfo(channels, limits)
    folder = options.model_dir
    if folder.endswith(".keras"):
        folder = os.path.dirname(folder)
    config_path = FileSystems.join(folder, CONFIG_FILENAME)
    if not FileSystems.exists(FileSystems.join(folder, KERAS_FILENAME)) or not \
            FileSystems.exists(config_path):
        raise PurifyPipelineError(f"{options.model_dir!r} is not a model directory (expected "
                                  f"{KERAS_FILENAME} and {CONFIG_FILENAME})")
    return ModelInfo(ComDefendConfig.from_dict(json.loads(outputs.read_text(config_path)))
                     .input_channels)


def build_pipeline(pipeline: beam.Pipeline, options: PurifyOptions, input_plan: plan.InputPlan,
                   model: ModelInfo) -> dict:
    """Adds the purify transforms to ``pipeline``; returns the dict of terminal PCollections.

    Batches hold images of one shape, at most ``batch_size`` (and an export's
    ``max_batch_size``); the handler cuts them to the export's pixels per request. Refusals of
    every stage (reading, decoding, the model, writing a PNG) meet in the dead letters.
    """
    output_dir = options.output_dir
    batch_size = options.batch_size
    if model.limits is not None:
        batch_size = min(batch_size, model.limits.max_images)
    sources = pipeline | "Read" >> ReadSourceImages(input_plan,
                                                    max_record_bytes=2 * options.max_bytes)
    decoded = sources | "CheckAndDecode" >> beam.ParDo(
        DecodeImages(model.channels, options.max_pixels, options.max_bytes,
                     model.limits.max_pixels if model.limits is not None else None)
    ).with_outputs(DecodeImages.REFUSED, main="images")
    encoded = (decoded["images"]
               | "KeyByShape" >> beam.Map(lambda image: (shape_key(image), image))
               | "BatchByShape" >> beam.GroupIntoBatches(batch_size)
               | "DropShapeKey" >> beam.Map(lambda shape_and_batch: list(shape_and_batch[1]))
               | "Purify" >> RunInference(options.model_handler(model.limits)
                                          .with_no_batching())
               | "EncodePng" >> beam.ParDo(outputs.EncodePurified()).with_outputs(
                   outputs.REFUSED, main="purified"))
    refused = [decoded[DecodeImages.REFUSED], encoded[outputs.REFUSED]]
    purified = encoded["purified"]
    terminals = {}
    if options.write_pngs:
        written_pngs = purified | "WritePngs" >> beam.ParDo(
            outputs.WritePng(FileSystems.join(output_dir, outputs.PNG_SUBDIR))).with_outputs(
                outputs.REFUSED, main="written")
        refused.append(written_pngs[outputs.REFUSED])
        purified = terminals["pngs"] = written_pngs["written"]
    terminals["tfrecords"] = (
        purified
        | "CountPurified" >> beam.ParDo(outputs.CountPurified())
        | "ToExample" >> beam.Map(to_example, options.include_code_bits)
        | "WriteTFRecords" >> beam.io.WriteToTFRecord(
            FileSystems.join(output_dir, outputs.PURIFIED_PREFIX),
            file_name_suffix=outputs.PURIFIED_SUFFIX, num_shards=options.num_shards))
    terminals["dead_letter"] = (
        refused
        | "AllRefused" >> beam.Flatten()
        | "RefusalToJson" >> beam.Map(refusals.Refusal.to_json)
        | "WriteDeadLetter" >> beam.io.WriteToText(
            FileSystems.join(output_dir, outputs.DEAD_LETTER_PREFIX),
            file_name_suffix=outputs.DEAD_LETTER_SUFFIX, num_shards=1))
    return terminals


def unknown_pipeline_flags(pipeline_args: Sequence[str]) -> list[str]:
    """The arguments that are no Beam pipeline option (a typo of ours would otherwise be
    passed to Beam, which only logs that it discards it), in their order.

    Parsed by the parser Beam builds from every registered options class (handed to
    ``get_all_options``' ``add_extra_args_fn``), so "known" means what Beam itself parses.

    Raises:
      PurifyPipelineError: an option's value does not parse (``--direct_num_workers=x``).
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    unknown = []

    def collect_unknown(parser):
        unknown.extend(parser.parse_known_args(list(pipeline_args))[1])

    try:
        PipelineOptions([]).get_all_options(add_extra_args_fn=collect_unknown)
    except SystemExit as error:  # argparse's exit on a value it cannot parse
        raise PurifyPipelineError(f"bad Beam pipeline option in {' '.join(pipeline_args)} "
                                  f"(see the usage line above)") from error
    return unknown


def check_request(options: PurifyOptions, pipeline_args: Sequence[str]
                  ) -> tuple[plan.InputPlan, ModelInfo]:
    """Everything checked before anything is written: Beam options, inputs, unique PNG
    names (``--write_pngs``), model, output folder (prepared last). Returns the input plan
    and the model's ``ModelInfo``.

    Raises:
      PurifyPipelineError: naming the first problem.
    """
    unknown = unknown_pipeline_flags(pipeline_args)
    if unknown:
        raise PurifyPipelineError(f"unknown flag(s) {' '.join(unknown)}: neither this program's "
                                  f"nor a Beam pipeline option")
    try:
        input_plan = plan.plan_inputs(options.input, options.data_dir, options.tfds_split,
                                      options.max_files)
    except plan.InputPlanError as error:
        raise PurifyPipelineError(str(error)) from error
    if options.write_pngs and input_plan.kind != "files":
        raise PurifyPipelineError("--write_pngs mirrors an input folder tree; it needs a folder "
                                  "or glob input, not records")
    if options.write_pngs:
        collision = outputs.colliding_png_keys(key for key, _, _ in input_plan.files)
        if collision:
            first, second, name = collision
            raise PurifyPipelineError(
                f"{refusals.escaped_name(first)!r} and {refusals.escaped_name(second)!r} would "
                f"both be written to {outputs.PNG_SUBDIR}/{refusals.escaped_name(name)!r} "
                f"under --write_pngs; rename one, or purify them in separate runs")
    model = model_info(options)
    if options.saved_model_dir is None and not plan.is_remote(options.model_dir):
        from comdefend_tf.model import load_comdefend

        load_comdefend(options.model_dir)  # fail here, not in a worker, on a broken model
    try:
        outputs.prepare_output_dir(options.output_dir, options.overwrite)
    except outputs.OutputDirError as error:
        raise PurifyPipelineError(str(error)) from error
    return input_plan, model


def run_purify_pipeline(options: PurifyOptions, pipeline_args: Sequence[str] = ()) -> dict:
    """Checks the request, runs the pipeline to completion and writes the manifest.

    Args:
      options: what to purify and where.
      pipeline_args: Beam pipeline options (``--runner=...``, ``--direct_num_workers=2``...).
        Without a runner (or with ``DirectRunner``, which first tries to download the Prism
        runner) the pipeline runs on ``FnApiRunner``, the engine DirectRunner falls back to.

    Returns:
      the manifest dict (also written to ``OUTPUT_DIR/manifest.json`` after every other output
      is committed): counts, bytes, seconds, the request and the output files.

    Raises:
      PurifyPipelineError: an argument that is no Beam option, bad inputs, model or output
        folder (nothing has been written).
    """
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    input_plan, model = check_request(options, pipeline_args)
    pipeline_options = PipelineOptions(list(pipeline_args))
    standard = pipeline_options.view_as(StandardOptions)
    if standard.runner in (None, "DirectRunner", "SwitchingDirectRunner"):
        standard.runner = "FnApiRunner"
    start = time.perf_counter()
    pipeline = beam.Pipeline(options=pipeline_options)
    build_pipeline(pipeline, options, input_plan, model)
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.perf_counter() - start
    counts = counters.read_counters(result)
    refused = {reason: counts[counters.refused_name(reason)] for reason in refusals.REASONS}
    output_dir = options.output_dir
    manifest = {
        "inputs": counts[counters.INPUTS], "purified": counts[counters.PURIFIED],
        "refused": sum(refused.values()), "refused_by_reason": refused,
        "input_bytes": counts[counters.INPUT_BYTES],
        "output_bytes": counts[counters.OUTPUT_BYTES],
        "seconds": round(seconds, 3),
        "runner": standard.runner,
        "input": options.input, "input_kind": input_plan.kind,
        "class_names": list(input_plan.class_names),
        "model": options.saved_model_dir or options.model_dir,
        "settings": {key: value for key, value in dataclasses.asdict(options).items()
                     if key not in ("input", "output_dir", "model_dir", "saved_model_dir")},
        "outputs": {
            "tfrecords": outputs.output_files(output_dir, outputs.PURIFIED_PREFIX,
                                              outputs.PURIFIED_SUFFIX),
            "dead_letter": outputs.output_files(output_dir, outputs.DEAD_LETTER_PREFIX,
                                                outputs.DEAD_LETTER_SUFFIX),
            "pngs": outputs.PNG_SUBDIR if options.write_pngs else None},
    }
    outputs.write_manifest(output_dir, manifest)
    return manifest
