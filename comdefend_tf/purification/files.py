"""Purifying image files one at a time: the purify command's loop, and one array at a time.

``purify_array``: float32 ``[H, W, C]`` in [0, 1] -> the purified image, same shape, in (0, 1);
in the whole-image mode an image above the pixel budget is tiled exactly (``automatic_tiling``,
``patches.exact_tiling``: the receptive-field radius as overlap), so no image size runs the
network out of memory and the result equals the whole-image one. ``purify_files`` reads each
input of a ``plan.plan_outputs`` pairing with ``io.images`` (limits checked before reading or
decoding), writes a rounded PNG atomically, never replacing a file unless ``overwrite`` (one
that appeared after planning, e.g. another run's output, is a refusal), and refuses
(``refusals``), by name and with a reason, every input it cannot read or write while the others
go on. A LiteRT purifier (``comdefend_tf.litert.runtime.LiteRTPurifier``: ``channels`` and
``purify``, no ``config``) is accepted wherever a ComDefend is: it tiles exactly by itself, so
``patch_size`` and the automatic tiling do not apply to it (``check_settings`` refuses them).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, Sequence

import numpy as np
from keras import ops
from tqdm import tqdm

from comdefend_tf.io import images as image_io
from comdefend_tf.patches import Tiling, exact_tiling, purify_patchwise, whole_image_pixel_budget
from comdefend_tf.purification import refusals

# The refusal of an input whose output path was taken after the run was planned.
OUTPUT_APPEARED = "output appeared during the run; not replaced without --overwrite"


def is_litert(model) -> bool:
    """Whether ``model`` is a LiteRT purifier (duck-typed: no ``config``, a ``purify``)."""
    return getattr(model, "config", None) is None and callable(getattr(model, "purify", None))


def model_channels(model) -> int:
    """The number of channels ``model`` takes (a ComDefend's config, a LiteRT purifier's)."""
    return model.channels if is_litert(model) else model.config.input_channels


def automatic_tiling(model, height: int, width: int,
                     tile_above_pixels: int | None = None) -> Tiling | None:
    """The exact tiling the whole-image mode switches to for a ``height`` x ``width`` image,
    or None when the image is within the budget.

    Args:
      model: a ``ComDefend`` (its ``config`` gives the widths and the receptive field).
      tile_above_pixels: the pixel budget of one network call; None: the model's default
        (``patches.whole_image_pixel_budget``); 0: never tile automatically.
    """
    if is_litert(model):
        return None  # it tiles by itself, within its file's input size
    if tile_above_pixels is None:
        tile_above_pixels = whole_image_pixel_budget(model.config)
    if tile_above_pixels < 0:
        raise ValueError(f"tile_above_pixels must be >= 0, got {tile_above_pixels}")
    if not tile_above_pixels or height * width <= tile_above_pixels:
        return None
    return exact_tiling(model.config, height, width, tile_above_pixels)


def check_settings(model, channel_order: str = "rgb",
                   tile_above_pixels: int | None = None, patch_size: int = 0,
                   overlap: int = 0) -> None:
    """Refuses settings ``purify_files`` cannot honour with ``model``, before any work.

    Raises:
      ValueError: the model takes other than 1 or 3 channels (image files are grey or RGB),
        ``bgr`` with a model of other than 3 channels, or a ``tile_above_pixels`` budget too
        small for one exact tile; with a LiteRT purifier, any ``patch_size``, ``overlap`` or
        ``tile_above_pixels`` (it tiles exactly within its file's input size by itself).
    """
    channels = model_channels(model)
    if channels not in (1, 3):
        raise ValueError(f"the model takes {channels}-channel images; image files are read as "
                         f"grey (1) or RGB (3)")
    if channel_order == "bgr" and channels != 3:
        raise ValueError(f"--channel_order=bgr needs a 3-channel model; this one has "
                         f"{channels}")
    if is_litert(model):
        for name, value in (("--patch_size", patch_size), ("--overlap", overlap),
                            ("--tile_above_pixels", tile_above_pixels)):
            if value:
                raise ValueError(f"{name} does not apply to a .tflite purifier: it tiles "
                                 "exactly within its file's input size by itself")
        return
    if tile_above_pixels:
        try:
            exact_tiling(model.config, 1, 1, tile_above_pixels)
        except ValueError as error:
            raise ValueError(f"--tile_above_pixels: {error}") from error


def purify_array(model, image: np.ndarray, patch_size: int = 0, overlap: int = 0,
                 channel_order: str = "rgb", batch_size: int = 64,
                 tile_above_pixels: int | None = None) -> np.ndarray:
    """Purifies one image.

    Args:
      model: a ``ComDefend`` (any callable from ``[n, h, w, c]`` to the same shape with the
        ComDefend ``config`` attribute; without it pass ``tile_above_pixels=0``), or a LiteRT
        purifier (``is_litert``: the whole image goes in; it tiles by itself).
      image: float32 ``[height, width, channels]`` in [0, 1], RGB order for 3 channels.
      patch_size: tile side in pixels, 0 for the whole image, tiled exactly when it is larger
        than ``tile_above_pixels`` (see ``automatic_tiling``).
      overlap: context pixels per tile side (see ``comdefend_tf.patches``).
      channel_order: ``rgb`` or ``bgr`` (channels reversed into and out of the network).
      batch_size: tiles per network call (with ``patch_size``).
      tile_above_pixels: pixel budget of the whole-image mode (None: the model's default,
        0: never tile automatically).

    Returns:
      float32 ``[height, width, channels]`` in (0, 1), in the input's (RGB) order.
    """
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"channel_order must be rgb or bgr, got {channel_order!r}")
    network_input = image[..., ::-1] if channel_order == "bgr" else image
    batch = np.ascontiguousarray(network_input[None], dtype=np.float32)
    if is_litert(model):
        purified = model.purify(batch)[0]
        return purified[..., ::-1] if channel_order == "bgr" else purified
    if not patch_size and tile_above_pixels != 0:
        tiling = automatic_tiling(model, image.shape[0], image.shape[1], tile_above_pixels)
        if tiling:
            patch_size, overlap, batch_size = tiling.patch_size, tiling.overlap, tiling.batch_size
    if patch_size:
        purified = purify_patchwise(lambda tiles: model(tiles, training=False), batch,
                                    patch_size=patch_size, overlap=overlap, batch_size=batch_size)
    else:
        purified = model(batch, training=False)
    purified = np.asarray(ops.convert_to_numpy(ops.cast(purified, "float32")))[0]
    return purified[..., ::-1] if channel_order == "bgr" else purified


@dataclasses.dataclass
class PurifySummary:
    """What one run did: written outputs, refused inputs as (path, reason) in the order met,
    how many images were tiled automatically, timing and PSNRs (dB)."""

    written: list[str] = dataclasses.field(default_factory=list)
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    auto_tiled: int = 0
    psnr_db: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        finite = [p for p in self.psnr_db if np.isfinite(p)]
        mean_psnr = f"{np.mean(finite):.2f} dB" if finite else "n/a"
        tiled = f" ({self.auto_tiled} tiled automatically)" if self.auto_tiled else ""
        refused = f", {len(self.failures)} refused" if self.failures else ""
        return (f"purified {len(self.written)} image(s){tiled} in {self.seconds:.1f} s"
                f"{refused}; mean PSNR of output vs input {mean_psnr}")

    def refusals(self) -> list[str]:
        """One line per refused input: ``refused 'PATH': REASON`` (the path quoted as Python
        would, so a hostile name cannot forge lines or terminal escapes)."""
        return [refusals.refused_line(path, reason) for path, reason in self.failures]


def purify_files(model, pairs: Sequence[tuple[str, str]], patch_size: int = 0, overlap: int = 0,
                 channel_order: str = "rgb", batch_size: int = 64,
                 to_uint8: Callable[[np.ndarray], np.ndarray] | None = None,
                 progress: bool = True, on_error: Callable[[str], None] | None = None,
                 tile_above_pixels: int | None = None,
                 max_image_pixels: int = image_io.DEFAULT_MAX_PIXELS,
                 max_file_bytes: int = image_io.DEFAULT_MAX_BYTES,
                 refused: Sequence[tuple[str, str]] = (),
                 overwrite: bool = False) -> PurifySummary:
    """Reads, purifies and writes each ``(input_path, output_path)`` pair, one at a time.

    An input that cannot be read within the limits (``image_io.read_image``: over
    ``max_file_bytes`` bytes or ``max_image_pixels`` declared pixels, not PNG/JPEG, corrupt,
    unsupported colour components, vanished) or whose output cannot be written is recorded in
    ``summary.failures`` with the reason (and passed to ``on_error``) and skipped; every other
    image is written. ``refused`` seeds the failures with inputs refused earlier (the listing's).
    Outputs are published without replacing anything unless ``overwrite``: a file, link or
    folder that appears at an output path during the run (another run writing to the same
    folder, a third party) is kept, and the input is refused ("output appeared during the
    run"), so two runs into one folder never silently replace each other's files.
    ``to_uint8`` converts float outputs to uint8 (default: rounding). PSNR is of the written
    uint8 output against the input (0..1 scale). ``tile_above_pixels``: see ``purify_array``.
    """
    to_uint8 = to_uint8 or image_io.to_uint8
    channels = model_channels(model)
    summary = PurifySummary(failures=list(refused))
    start = time.perf_counter()

    def refuse(path, error):
        detail = refusals.detail_of(error, path)
        summary.failures.append((path, detail))
        if on_error:
            on_error(refusals.refused_line(path, detail))

    for source, target in tqdm(pairs, desc="purify", unit="image", disable=not progress,
                               file=sys.stderr):
        try:
            image = image_io.read_image(source, channels=channels, max_pixels=max_image_pixels,
                                        max_bytes=max_file_bytes)
        except (image_io.ImageReadError, OSError) as error:
            refuse(source, error)
            continue
        if not patch_size and automatic_tiling(model, image.shape[0], image.shape[1],
                                               tile_above_pixels):
            summary.auto_tiled += 1
        purified = purify_array(model, image, patch_size, overlap, channel_order, batch_size,
                                tile_above_pixels)
        output = to_uint8(purified)
        del purified
        try:
            image_io.write_png(target, output, replace=overwrite)
        except FileExistsError:
            refuse(source, f"{OUTPUT_APPEARED} ({target!r})")
            continue
        except OSError as error:
            refuse(source, f"cannot write {target!r}: {error}")
            continue
        summary.written.append(target)
        summary.psnr_db.append(image_io.psnr_db(image, output.astype(np.float32) / 255.0))
    summary.seconds = time.perf_counter() - start
    return summary
