"""Purifying image files: planning safe output paths, purifying one array, and the loop over
files that the purify command (``export/purify_images.py``) and the demo tools share.

Safety rules (checked by ``plan_outputs`` before anything is written): never write into a
folder that holds an input image, never write an output over an input file (through links or
not), never let an output name leave the output folder, never let two inputs share an output
name, never replace an existing output (or a link planted in its place) unless asked.

``purify_files`` refuses, by name and with a reason, every input that is not a readable PNG or
JPEG within the limits (``image_io``: bytes, declared pixels, format, corruption, colour
components) and goes on with the others; the summary lists them.

Memory: in the default whole-image mode an image larger than ``tile_above_pixels`` (default
``patches.whole_image_pixel_budget``: the model's widths against a 2 GiB activation target,
about 350 k pixels for the ``paper`` widths) is tiled automatically with the receptive-field
radius as overlap, which gives exactly the whole-image result (``patches.exact_tiling``), so no
image size runs the network out of memory by default.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np
from keras import ops
from tqdm import tqdm

from comdefend_tf.io import images as image_io
from comdefend_tf.patches import Tiling, exact_tiling, purify_patchwise, whole_image_pixel_budget


class OutputPlanError(ValueError):
    """The requested outputs would overwrite files, collide, or land in an input folder."""


def plan_outputs(input_paths: Sequence[str], output_dir: str,
                 overwrite: bool = False) -> list[tuple[str, str]]:
    """Pairs each input with ``OUTPUT_DIR/<stem>.png`` after checking the plan is safe.

    Raises:
      OutputPlanError: ``output_dir`` holds an input image, an output would be an input file
        or land outside ``output_dir``, two inputs share an output name, or (without
        ``overwrite``) an output file or link already exists. Nothing has been written.
    """
    output_real = os.path.realpath(output_dir)
    output_folder = os.path.normpath(os.path.abspath(output_dir))
    input_folders = {os.path.realpath(os.path.dirname(os.path.abspath(p))) for p in input_paths}
    if output_real in input_folders:
        raise OutputPlanError(f"output folder {output_dir!r} holds input images; choose another "
                              f"folder (purified images are never written into an input folder)")
    input_files = {os.path.realpath(p) for p in input_paths}
    pairs, claimed = [], {}
    for path in input_paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        target = os.path.join(output_dir, stem + ".png")
        if (os.path.dirname(os.path.normpath(os.path.abspath(target))) != output_folder
                or stem in ("", ".", "..")):
            raise OutputPlanError(f"the output name for {path!r} would leave {output_dir!r}")
        if os.path.realpath(target) in input_files:
            raise OutputPlanError(f"{target!r} is an input file (or a link to one); purified "
                                  f"images never replace inputs")
        if target in claimed:
            raise OutputPlanError(f"{claimed[target]!r} and {path!r} would both be written to "
                                  f"{target!r}; purify them into different folders")
        claimed[target] = path
        pairs.append((path, target))
    if not overwrite:
        existing = [target for _, target in pairs if os.path.lexists(target)]
        if existing:
            raise OutputPlanError(f"{len(existing)} output file(s) already exist (first: "
                                  f"{existing[0]!r}); pass --overwrite (overwrite=True) to "
                                  f"replace them")
    return pairs


def automatic_tiling(model, height: int, width: int,
                     tile_above_pixels: int | None = None) -> Tiling | None:
    """The exact tiling the whole-image mode switches to for a ``height`` x ``width`` image,
    or None when the image is within the budget.

    Args:
      model: a ``ComDefend`` (its ``config`` gives the widths and the receptive field).
      tile_above_pixels: the pixel budget of one network call; None: the model's default
        (``patches.whole_image_pixel_budget``); 0: never tile automatically.
    """
    if tile_above_pixels is None:
        tile_above_pixels = whole_image_pixel_budget(model.config)
    if tile_above_pixels < 0:
        raise ValueError(f"tile_above_pixels must be >= 0, got {tile_above_pixels}")
    if not tile_above_pixels or height * width <= tile_above_pixels:
        return None
    return exact_tiling(model.config, height, width, tile_above_pixels)


def purify_array(model, image: np.ndarray, patch_size: int = 0, overlap: int = 0,
                 channel_order: str = "rgb", batch_size: int = 64,
                 tile_above_pixels: int | None = None) -> np.ndarray:
    """Purifies one image.

    Args:
      model: a ``ComDefend`` (any callable from ``[n, h, w, c]`` to the same shape with the
        ComDefend ``config`` attribute; without it pass ``tile_above_pixels=0``).
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
        return [f"refused {path!r}: {reason}" for path, reason in self.failures]


def purify_files(model, pairs: Sequence[tuple[str, str]], patch_size: int = 0, overlap: int = 0,
                 channel_order: str = "rgb", batch_size: int = 64,
                 to_uint8: Callable[[np.ndarray], np.ndarray] | None = None,
                 progress: bool = True, on_error: Callable[[str], None] | None = None,
                 tile_above_pixels: int | None = None,
                 max_image_pixels: int = image_io.DEFAULT_MAX_PIXELS,
                 max_file_bytes: int = image_io.DEFAULT_MAX_BYTES,
                 refused: Sequence[tuple[str, str]] = ()) -> PurifySummary:
    """Reads, purifies and writes each ``(input_path, output_path)`` pair, one at a time.

    An input that cannot be read within the limits (``image_io.read_image``: over
    ``max_file_bytes`` bytes or ``max_image_pixels`` declared pixels, not PNG/JPEG, corrupt,
    unsupported colour components, vanished) or whose output cannot be written is recorded in
    ``summary.failures`` with the reason (and passed to ``on_error``) and skipped; every other
    image is written. ``refused`` seeds the failures with inputs refused earlier (the listing's).
    ``to_uint8`` converts float outputs to uint8 (default: rounding). PSNR is of the written
    uint8 output against the input (0..1 scale). ``tile_above_pixels``: see ``purify_array``.
    """
    to_uint8 = to_uint8 or image_io.to_uint8
    channels = model.config.input_channels
    summary = PurifySummary(failures=list(refused))
    start = time.perf_counter()

    def refuse(path, reason):
        # image_io's messages start with the quoted path, which the summary already shows.
        reason = reason.removeprefix(repr(path)).lstrip(": ") or reason
        summary.failures.append((path, reason))
        if on_error:
            on_error(f"refused {path!r}: {reason}")

    for source, target in tqdm(pairs, desc="purify", unit="image", disable=not progress,
                               file=sys.stderr):
        try:
            image = image_io.read_image(source, channels=channels, max_pixels=max_image_pixels,
                                        max_bytes=max_file_bytes)
        except (image_io.ImageReadError, OSError) as error:
            refuse(source, str(error))
            continue
        if not patch_size and automatic_tiling(model, image.shape[0], image.shape[1],
                                               tile_above_pixels):
            summary.auto_tiled += 1
        purified = purify_array(model, image, patch_size, overlap, channel_order, batch_size,
                                tile_above_pixels)
        output = to_uint8(purified)
        del purified
        try:
            image_io.write_png(target, output)
        except OSError as error:
            refuse(source, f"cannot write {target!r}: {error}")
            continue
        summary.written.append(target)
        summary.psnr_db.append(image_io.psnr_db(image, output.astype(np.float32) / 255.0))
    summary.seconds = time.perf_counter() - start
    return summary
