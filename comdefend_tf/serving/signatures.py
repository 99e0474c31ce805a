"""The serving signatures of ComDefend: one purify core and a thin adapter per input type.

``ComDefendServing`` (a ``tf.Module``) holds them, each a ``tf.function`` with an input
signature; every input is checked in the graph before any decoding or network call, and a
refusal is an ``InvalidArgumentError`` naming the first problem (``request_checks``):

* ``purify``: ``images`` float32 ``[batch, height, width, C]`` in [0, 1] (declared with unknown
  rank) -> ``purified`` float32 (same shape, in [0, 1]) and ``code_bits`` uint8
  ``[batch, height, width, code_channels]`` (0/1).
* ``purify_bytes``: ``image_bytes`` string ``[batch]`` of PNG or JPEG files (sizes may differ;
  the headers' declared sizes count against ``max_pixels`` before decoding) ->
  ``purified_png_bytes`` string ``[batch]`` of 8-bit PNGs.
* ``purify_examples``: ``examples`` string ``[batch]`` of serialized ``tf.train.Example``
  (``image/encoded``, ``comdefend_tf.io.examples``) -> as ``purify_bytes``.
* ``classify`` (with a classifier): ``images`` as ``purify`` -> ``probabilities`` float32
  ``[batch, num_classes]`` and ``class_ids`` int64 ``[batch]``: the classifier on the purified
  images. ``serving_default`` is ``classify`` when present, else ``purify`` (an alias).
"""

from __future__ import annotations

from typing import Callable

import keras
import tensorflow as tf

from comdefend_tf.io import examples as example_io
from comdefend_tf.io import graph_headers
from comdefend_tf.model import ComDefend
from comdefend_tf.serving import classifier_spec
from comdefend_tf.serving.request_checks import (validate_declared_pixels,
                                                 validate_encoded_batch, validate_examples,
                                                 validate_images)
from comdefend_tf.serving.settings import ExportSettings, effective_noise_std
from comdefend_tf.serving.tiling import map_in_chunks, purify_patchwise_graph

SIGNATURE_PURIFY = "purify"
SIGNATURE_PURIFY_BYTES = "purify_bytes"
SIGNATURE_PURIFY_EXAMPLES = "purify_examples"
SIGNATURE_CLASSIFY = "classify"
SIGNATURE_DEFAULT = "serving_default"
INPUT_IMAGES = "images"
INPUT_IMAGE_BYTES = "image_bytes"
INPUT_EXAMPLES = "examples"

# Declared with unknown rank: a model server feeds tensors without checking declared shapes,
# so the rank is checked in the graph (``request_checks``) before anything else runs.
_IMAGES = tf.TensorSpec(None, tf.float32, name=INPUT_IMAGES)
_IMAGE_BYTES = tf.TensorSpec(None, tf.string, name=INPUT_IMAGE_BYTES)
_EXAMPLES = tf.TensorSpec(None, tf.string, name=INPUT_EXAMPLES)

# Noise streams: with a fixed noise seed every signature draws its own reproducible stream.
_STREAM_CORE, _STREAM_PURIFY, _STREAM_BYTES, _STREAM_CLASSIFY, _STREAM_EXAMPLES = range(5)


def _noise_stream(std: float, seed: int | None, stream: int) -> Callable | None:
    """A function from a shape to float32 noise ``N(0, std**2)``, or None when ``std`` is 0.

    The draw is TensorFlow's stateful ``RandomStandardNormal``: seed 0/0 (no ``seed``) makes
    each kernel seed itself from OS entropy when the graph is loaded; with ``seed`` the op gets
    ``(seed, stream + 1)`` (never 0/0), so each signature has its own reproducible stream.
    """
    if std == 0.0:
        return None
    op_seed, op_seed2 = (0, 0) if seed is None else (seed, stream + 1)

    def draw(shape):
        return std * tf.raw_ops.RandomStandardNormal(shape=shape, dtype=tf.float32,
                                                     seed=op_seed, seed2=op_seed2)

    return draw


def _to_png(purified: tf.Tensor) -> tf.Tensor:
    """float ``[height, width, C]`` in [0, 1] -> an 8-bit PNG string (rounded, clipped)."""
    pixels = tf.cast(tf.round(tf.clip_by_value(purified, 0.0, 1.0) * 255.0), tf.uint8)
    return tf.io.encode_png(pixels)


class ComDefendServing(tf.Module):
    """The export module: ``serve`` (the purify core) and one adapter per input type.

    Args:
      purifier: a ComDefend model (its encoder and decoder weights are used as they are; the
        inference noise comes from ``settings`` and is drawn in the graph, never by the model's
        seed generator, whose state a SavedModel would carry).
      classifier: optional Keras model from float32 ``[batch, height, width, C]`` in [0, 1] to
        logits or probabilities ``[batch, num_classes]``; adds ``classify``.
      settings: the export settings.

    Raises:
      ValueError: the classifier takes another number of channels than the purifier produces,
        or has no static number of classes.

    Attributes:
      purify, purify_bytes, purify_examples, classify (None without a classifier): the
        signature functions; serving_default: the same object as ``classify`` or ``purify``.
      purify_core: ``serve`` as a ``tf.function`` on float32 ``[None, None, None, C]`` (no
        validation, not a signature).
      signatures: name -> function in export order, ``serving_default``'s target first.
    """

    def __init__(self, purifier: ComDefend, classifier: keras.Model | None = None,
                 settings: ExportSettings = ExportSettings()):
        super().__init__(name="comdefend_serving")
        config = purifier.config
        self.purifier = purifier
        self.classifier = classifier
        self.settings = settings
        self._channels = config.input_channels
        self._overlap = settings.overlap_for(config)
        self._chunk_pixels = settings.chunk_pixels_for(config)
        self._noise_std = effective_noise_std(purifier, settings)
        self.purify_core = tf.function(self._purify_core, input_signature=[
            tf.TensorSpec([None, None, None, self._channels], tf.float32, name=INPUT_IMAGES)])
        self.purify = tf.function(self._purify, input_signature=[_IMAGES])
        self.purify_bytes = tf.function(self._purify_bytes, input_signature=[_IMAGE_BYTES])
        self.purify_examples = tf.function(self._purify_examples, input_signature=[_EXAMPLES])
        self.classify = None
        if classifier is not None:
            self._prepare_classifier(classifier)
            self.classify = tf.function(self._classify, input_signature=[_IMAGES])
        self.serving_default = self.purify if self.classify is None else self.classify

    @property
    def signatures(self) -> dict:
        functions = {} if self.classify is None else {SIGNATURE_CLASSIFY: self.classify}
        functions.update({SIGNATURE_PURIFY: self.purify, SIGNATURE_PURIFY_BYTES: self.purify_bytes,
                          SIGNATURE_PURIFY_EXAMPLES: self.purify_examples})
        return functions

    # ------------------------------------------------------------------------- the core
    def serve(self, images: tf.Tensor, stream: int) -> dict:
        """Validated float32 ``[batch, height, width, C]`` in [0, 1] -> dict(``purified``
        float32 same shape, ``code_bits`` uint8 ``[batch, height, width, code_channels]``),
        tiled in the graph (``tiling``); ``stream`` tells the signatures' noise ops apart."""
        config, purifier = self.purifier.config, self.purifier
        draw = _noise_stream(self._noise_std, self.settings.noise_seed, stream)

        def purify_windows(windows):
            code_shape = tf.concat([tf.shape(windows)[:3], [config.code_channels]], axis=0)
            # Always an explicit noise tensor: the model's own CodeNoise never draws here.
            noise = tf.zeros([], tf.float32) if draw is None else draw(code_shape)
            # The compute dtype of a mixed-precision purifier inside; float32 outside.
            outputs = purifier.forward(tf.cast(windows, purifier.compute_dtype), training=False,
                                       noise=noise)
            return {"purified": tf.cast(outputs["purified"], tf.float32),
                    "code_bits": tf.cast(outputs["noisy_logits"] > 0, tf.uint8)}

        output_specs = {"purified": (tf.float32, self._channels),
                        "code_bits": (tf.uint8, config.code_channels)}
        return purify_patchwise_graph(purify_windows, images, self.settings.patch_size,
                                      self._overlap, self._chunk_pixels, output_specs)

    def _purify_core(self, images):
        return self.serve(images, _STREAM_CORE)

    # --------------------------------------------------------------- float image adapter
    def _checked_images(self, images, height_width=None):
        return validate_images(images, self._channels, self.settings.max_pixels, height_width,
                               self.settings.max_batch_size)

    def _purify(self, images):
        return self.serve(self._checked_images(images), _STREAM_PURIFY)

    # ------------------------------------------------------------ encoded-bytes adapters
    def _purify_encoded(self, image_bytes, stream: int) -> dict:
        """Encoded PNG/JPEG strings (any shape; checked to be rank 1) -> purified PNGs."""
        image_bytes = validate_encoded_batch(image_bytes, self.settings.max_batch_size)
        heights, widths, is_png = graph_headers.declared_sizes(image_bytes)
        image_bytes = validate_declared_pixels(image_bytes, heights, widths,
                                               self.settings.max_pixels)
        image_bytes = graph_headers.check_payloads(image_bytes, heights, widths, is_png)

        def purify_one(element):
            encoded, png, height, width = element
            image = graph_headers.decode_declared(encoded, png, height, width, self._channels)
            return _to_png(self.serve(image[None], stream)["purified"][0])

        pngs = tf.map_fn(purify_one, (image_bytes, is_png, heights, widths),
                         parallel_iterations=1, fn_output_signature=tf.TensorSpec([], tf.string))
        return {"purified_png_bytes": pngs}

    def _purify_bytes(self, image_bytes):
        return self._purify_encoded(image_bytes, _STREAM_BYTES)

    def _purify_examples(self, examples):
        # A missing image/encoded parses as "" and is refused as neither PNG nor JPEG.
        checked = validate_examples(examples, self.settings.max_batch_size)
        return self._purify_encoded(example_io.parse_encoded(checked), _STREAM_EXAMPLES)

    # ------------------------------------------------------------ classify: composition
    def _prepare_classifier(self, classifier: keras.Model) -> None:
        channels = classifier_spec.classifier_channels(classifier)
        if channels is not None and channels != self._channels:
            raise ValueError(f"the classifier takes {channels}-channel images but the "
                             f"purifier produces {self._channels}-channel images")
        self._height_width = classifier_spec.classifier_height_width(classifier)
        if self.settings.classifier_outputs == "auto":
            self._emits_probabilities = classifier_spec.classifier_emits_probabilities(classifier)
        else:
            self._emits_probabilities = self.settings.classifier_outputs == "probabilities"
        self._num_classes = classifier_spec.classifier_num_classes(
            classifier, self._height_width, self._channels)

    def _classify(self, images):
        purified = self.serve(self._checked_images(images, self._height_width),
                              _STREAM_CLASSIFY)["purified"]

        def scores_of(chunk):
            return tf.cast(self.classifier(chunk, training=False), tf.float32)

        # In chunks of the core's pixel budget: the classifier's memory is bounded too.
        scores = map_in_chunks(scores_of, purified, self._chunk_pixels, self._num_classes)
        probabilities = (scores if self._emits_probabilities
                         else tf.nn.softmax(scores, axis=-1))
        return {"probabilities": probabilities,
                "class_ids": tf.argmax(probabilities, axis=-1, output_type=tf.int64)}


def build_serving_functions(purifier: ComDefend, classifier: keras.Model | None = None,
                            settings: ExportSettings = ExportSettings()) -> ComDefendServing:
    """The serving module for ``purifier`` (and ``classifier``); see ``ComDefendServing``."""
    return ComDefendServing(purifier, classifier, settings)
