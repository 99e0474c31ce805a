"""``LiteRTPurifier``: a converted ``.tflite`` purifier run with the LiteRT interpreter.

``purifier(images)`` takes float32 ``[batch, height, width, C]`` in [0, 1] and returns a dict of
numpy arrays: ``purified`` float32 (same shape, in [0, 1]) and ``code_bits`` uint8 ``[batch,
height, width, code_channels]``, as the serving ``purify`` signature does. Input is refused
before any work (``LiteRTInputError``, a ``ValueError`` naming the first problem, worded as
``serving.request_checks``): dtype, rank, channels, empty, batch and pixel budgets (the serving
export's defaults), NaN or infinite values, values outside [0, 1].

Sizes: the file has one input size (``image_size``); images no larger run whole (the input is
resized, an exact convolution at any size); larger ones are cut into windows of at most that
size with ``comdefend_tf.patches.purify_patchwise`` and an overlap of the receptive-field
radius (one pixel per 3x3 convolution of the file), so tiled output equals whole-image output
as in the SavedModel. Each network call holds at most ``batch_pixels`` window pixels.
The file is read with ``io.bounded`` (at most ``max_file_bytes``).
"""

from __future__ import annotations

import numpy as np

from comdefend_tf.io import bounded
from comdefend_tf.litert.ops import (
    LiteRTModelError,
    check_ops,
    interpreter_class,
    no_delegate_resolver,
    op_report,
)
from comdefend_tf.patches import purify_patchwise
from comdefend_tf.serving.settings import ExportSettings

DEFAULT_MAX_FILE_BYTES = 256 * 2**20  # the paper-size purifier is about 1 MB in float32
_DEFAULTS = ExportSettings()
DEFAULT_MAX_PIXELS = _DEFAULTS.max_pixels
DEFAULT_MAX_BATCH_SIZE = _DEFAULTS.max_batch_size
DEFAULT_WINDOWS_PER_CALL = 64


class LiteRTInputError(ValueError):
    """Images the LiteRT purifier refuses; the message names the first problem."""


def check_images(images, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> np.ndarray:
    """``images`` as a float32 array once every check passed (see the module docstring);
    the values are looked at only after the shape passed, as in ``request_checks``."""
    array = np.asarray(images) if not isinstance(images, np.ndarray) else images
    if array.dtype != np.float32:
        raise LiteRTInputError(f"images must be float32 values in [0, 1]; got dtype "
                               f"{array.dtype}")
    shape = array.shape
    if array.ndim != 4:
        raise LiteRTInputError("images must be a rank-4 tensor [batch, height, width, channels] "
                               f"of float32 values in [0, 1]; got rank {array.ndim} and shape "
                               f"{shape}")
    if shape[3] != channels:
        raise LiteRTInputError(f"images must have {channels} channel(s) (the purifier's "
                               f"input_channels); got {shape[3]} in shape {shape}")
    if min(shape[:3]) < 1:
        raise LiteRTInputError(f"images must hold at least one image of at least 1x1 pixels; "
                               f"got shape {shape}")
    if shape[0] > max_batch_size:
        raise LiteRTInputError(f"too many images: at most {max_batch_size} images per request "
                               f"are accepted; got batch {shape[0]}")
    if shape[0] * shape[1] * shape[2] > max_pixels:  # Python ints: no wrap-around
        raise LiteRTInputError(f"too many pixels: at most {max_pixels} (batch x height x width) "
                               f"per request are accepted; got shape {shape}")
    if np.isnan(array).any():
        raise LiteRTInputError("images contain NaN values")
    smallest, largest = float(array.min()), float(array.max())
    if not (smallest >= 0.0 and largest <= 1.0):
        raise LiteRTInputError("images must hold values in [0, 1] (divide 8-bit pixels by 255); "
                               f"got min {smallest} max {largest}")
    return array


def read_model(path: str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The bytes of the ``.tflite`` file at ``path`` (``LiteRTModelError`` naming the path
    when it is missing, not a regular file or larger than ``max_file_bytes``)."""
    try:
        return bounded.read_regular_file(path, max_file_bytes)
    except FileNotFoundError:
        raise LiteRTModelError(f"no LiteRT model at {path!r}") from None
    except bounded.NotRegularFileError:
        raise LiteRTModelError(f"{path!r} is not a regular file") from None
    except bounded.FileTooLargeError as error:
        raise LiteRTModelError(f"{path!r} has {error}, over the {max_file_bytes}-byte limit "
                               "for a LiteRT model") from None
    except (OSError, bounded.FileReadError) as error:
        raise LiteRTModelError(f"cannot read {path!r}: {error}") from None


class LiteRTPurifier:
    """A converted purifier (``convert.convert``) behind the checks of the serving signatures.

    Args:
      model: the path of a ``.tflite`` file, or its bytes.
      num_threads: interpreter threads (None: LiteRT's default).
      use_xnnpack: True applies LiteRT's default XNNPACK delegate (the interpreter's default);
        False runs the builtin kernels only.
      max_pixels, max_batch_size: the request budgets (the serving export's defaults).
      batch_pixels: window pixels per network call in the patch-wise path (default: 64 windows
        of the file's size).
      max_file_bytes: the largest file read.

    Attributes:
      image_size: (height, width) of the file's input; channels, code_channels; overlap (the
      receptive-field radius); randomized (the file draws code noise); model_bytes.

    Raises:
      LiteRTModelError: unreadable file, or not a purifier with ``images`` in and ``purified``
        and ``code_bits`` out.
      optional.MissingExtra: ``ai_edge_litert`` is not installed.
    """

    def __init__(self, model, num_threads: int | None = None, use_xnnpack: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 batch_pixels: int | None = None,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
        content = model if isinstance(model, bytes) else read_model(model, max_file_bytes)
        self.model_bytes = content
        check_ops(content)
        interpreter_type = interpreter_class()
        options = {} if use_xnnpack else {"experimental_op_resolver_type": no_delegate_resolver()}
        try:
            self._interpreter = interpreter_type(model_content=content, num_threads=num_threads,
                                                 **options)
            self._interpreter.allocate_tensors()
            report = op_report(content)
        except (ValueError, RuntimeError) as error:
            raise LiteRTModelError(f"not a LiteRT model: {error}") from None
        inputs = self._interpreter.get_input_details()
        # The converter drops output names; the two outputs differ in dtype (convert.py).
        outputs = {np.dtype(d["dtype"]).name: d for d in self._interpreter.get_output_details()}
        if (len(inputs) != 1 or len(inputs[0]["shape"]) != 4
                or np.dtype(inputs[0]["dtype"]) != np.float32
                or sorted(outputs) != ["float32", "uint8"]):
            raise LiteRTModelError("the model is not a converted ComDefend purifier (one float32 "
                                   "[batch, height, width, channels] input; float32 purified "
                                   "and uint8 code_bits outputs)")
        self._input = inputs[0]["index"]
        self._outputs = {"purified": outputs["float32"]["index"],
                         "code_bits": outputs["uint8"]["index"]}
        _, height, width, self.channels = (int(v) for v in inputs[0]["shape"])
        self.image_size = (height, width)
        self.code_channels = int(outputs["uint8"]["shape"][-1])
        # One pixel of context per 3x3 convolution, as patches.receptive_field_radius counts.
        self.overlap = sum(op["op"] == "CONV_2D" for op in report["ops"])
        self.randomized = "RANDOM_STANDARD_NORMAL" in {op["op"] for op in report["ops"]}
        self.max_pixels, self.max_batch_size = max_pixels, max_batch_size
        self.batch_pixels = batch_pixels or DEFAULT_WINDOWS_PER_CALL * height * width
        self._shape = tuple(int(v) for v in inputs[0]["shape"])

    # ----------------------------------------------------------------------- one call
    def _invoke(self, windows: np.ndarray) -> np.ndarray:
        """float32 ``[n, h, w, C]`` -> purified and code bits concatenated on the last axis
        (float32 ``[n, h, w, C + code]``): one array, so the patch-wise stitcher carries both."""
        if windows.shape != self._shape:
            self._interpreter.resize_tensor_input(self._input, list(windows.shape))
            self._interpreter.allocate_tensors()
            self._shape = windows.shape
        self._interpreter.set_tensor(self._input, windows)
        self._interpreter.invoke()
        purified = self._interpreter.get_tensor(self._outputs["purified"])
        bits = self._interpreter.get_tensor(self._outputs["code_bits"]).astype(np.float32)
        return np.concatenate([purified, bits], axis=-1)

    def _invoke_in_chunks(self, images: np.ndarray) -> np.ndarray:
        per_call = max(1, self.batch_pixels // (images.shape[1] * images.shape[2]))
        return np.concatenate([self._invoke(np.ascontiguousarray(images[first:first + per_call]))
                               for first in range(0, len(images), per_call)], axis=0)

    def __call__(self, images) -> dict:
        """Checked images -> ``{"purified": float32, "code_bits": uint8}`` (module docstring)."""
        images = check_images(images, self.channels, self.max_pixels, self.max_batch_size)
        height, width = images.shape[1:3]
        if height <= self.image_size[0] and width <= self.image_size[1]:
            joined = self._invoke_in_chunks(images)
        else:
            joined = self._patchwise(images)
        return {"purified": joined[..., :self.channels],
                "code_bits": np.round(joined[..., self.channels:]).astype(np.uint8)}

    def _patchwise(self, images: np.ndarray) -> np.ndarray:
        patch = min(self.image_size) - 2 * self.overlap
        if patch < 1:
            raise LiteRTInputError(
                f"images larger than the model's {self.image_size[0]}x{self.image_size[1]} "
                f"input need tiles with {self.overlap} pixels of context per side, which do "
                "not fit in it; convert the purifier at a larger --image_size")
        window = patch + 2 * self.overlap
        per_call = max(1, self.batch_pixels // (window * window))

        def purify_windows(windows):
            return self._invoke(np.ascontiguousarray(np.asarray(windows), dtype=np.float32))

        stitched = purify_patchwise(purify_windows, images, patch_size=patch,
                                    overlap=self.overlap, batch_size=per_call)
        return np.asarray(stitched)

    def purify(self, images) -> np.ndarray:
        """Only the purified images (float32, same shape as ``images``)."""
        return self(images)["purified"]
