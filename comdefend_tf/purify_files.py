"""Purifying image files: planning safe output paths, purifying one array, and the loop over
files that the purify command (``export/purify_images.py``) and the demo tools share.

Safety rules (checked by ``plan_outputs`` before anything is written): never write into a
folder that holds an input image, never let two inputs share an output name, never replace an
existing output unless asked. ``purify_files`` skips unreadable inputs and records them, so one
bad file does not cost the others.
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

from comdefend_tf import image_io
from comdefend_tf.patches import purify_patchwise


class OutputPlanError(ValueError):
    """The requested outputs would overwrite files, collide, or land in an input folder."""


def plan_outputs(input_paths: Sequence[str], output_dir: str,
                 overwrite: bool = False) -> list[tuple[str, str]]:
    """Pairs each input with ``OUTPUT_DIR/<stem>.png`` after checking the plan is safe.

    Raises:
      OutputPlanError: ``output_dir`` holds an input image, two inputs share an output name,
        or (without ``overwrite``) an output file already exists. Nothing has been written.
    """
    output_real = os.path.realpath(output_dir)
    input_folders = {os.path.realpath(os.path.dirname(os.path.abspath(p))) for p in input_paths}
    if output_real in input_folders:
        raise OutputPlanError(f"output folder {output_dir!r} holds input images; choose another "
                              f"folder (purified images are never written into an input folder)")
    pairs, claimed = [], {}
    for path in input_paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        target = os.path.join(output_dir, stem + ".png")
        if target in claimed:
            raise OutputPlanError(f"{claimed[target]!r} and {path!r} would both be written to "
                                  f"{target!r}; purify them into different folders")
        claimed[target] = path
        pairs.append((path, target))
    if not overwrite:
        existing = [target for _, target in pairs if os.path.exists(target)]
        if existing:
            raise OutputPlanError(f"{len(existing)} output file(s) already exist (first: "
                                  f"{existing[0]!r}); pass --overwrite (overwrite=True) to "
                                  f"replace them")
    return pairs


def purify_array(model, image: np.ndarray, patch_size: int = 0, overlap: int = 0,
                 channel_order: str = "rgb", batch_size: int = 64) -> np.ndarray:
    """Purifies one image.

    Args:
      model: a ``ComDefend`` (any callable from ``[n, h, w, c]`` to the same shape).
      image: float32 ``[height, width, channels]`` in [0, 1], RGB order for 3 channels.
      patch_size: tile side in pixels, 0 for the whole image at once.
      overlap: context pixels per tile side (see ``comdefend_tf.patches``).
      channel_order: ``rgb`` or ``bgr`` (channels reversed into and out of the network).
      batch_size: tiles per network call.

    Returns:
      float32 ``[height, width, channels]`` in (0, 1), in the input's (RGB) order.
    """
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"channel_order must be rgb or bgr, got {channel_order!r}")
    network_input = image[..., ::-1] if channel_order == "bgr" else image
    batch = np.ascontiguousarray(network_input[None], dtype=np.float32)
    if patch_size:
        purified = purify_patchwise(lambda tiles: model(tiles, training=False), batch,
                                    patch_size=patch_size, overlap=overlap, batch_size=batch_size)
    else:
        purified = model(batch, training=False)
    purified = np.asarray(ops.convert_to_numpy(ops.cast(purified, "float32")))[0]
    return purified[..., ::-1] if channel_order == "bgr" else purified


@dataclasses.dataclass
class PurifySummary:
    """What one run did: written outputs, failures (path, message), timing and PSNRs (dB)."""

    written: list[str] = dataclasses.field(default_factory=list)
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    psnr_db: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        finite = [p for p in self.psnr_db if np.isfinite(p)]
        mean_psnr = f"{np.mean(finite):.2f} dB" if finite else "n/a"
        failed = f", {len(self.failures)} failed" if self.failures else ""
        return (f"purified {len(self.written)} image(s) in {self.seconds:.1f} s{failed}; "
                f"mean PSNR of output vs input {mean_psnr}")


def purify_files(model, pairs: Sequence[tuple[str, str]], patch_size: int = 0, overlap: int = 0,
                 channel_order: str = "rgb", batch_size: int = 64,
                 to_uint8: Callable[[np.ndarray], np.ndarray] | None = None,
                 progress: bool = True, on_error: Callable[[str], None] | None = None
                 ) -> PurifySummary:
    """Reads, purifies and writes each ``(input_path, output_path)`` pair.

    Unreadable inputs are recorded in ``summary.failures`` (and passed to ``on_error``) and
    skipped; every other image is written. ``to_uint8`` converts float outputs to uint8
    (default: rounding). PSNR is of the written uint8 output against the input (0..1 scale).
    """
    to_uint8 = to_uint8 or image_io.to_uint8
    channels = model.config.input_channels
    summary = PurifySummary()
    start = time.perf_counter()
    for source, target in tqdm(pairs, desc="purify", unit="image", disable=not progress,
                               file=sys.stderr):
        try:
            image = image_io.read_image(source, channels=channels)
        except (image_io.ImageReadError, OSError) as error:
            summary.failures.append((source, str(error)))
            if on_error:
                on_error(str(error))
            continue
        purified = purify_array(model, image, patch_size, overlap, channel_order, batch_size)
        output = to_uint8(purified)
        image_io.write_png(target, output)
        summary.written.append(target)
        summary.psnr_db.append(image_io.psnr_db(image, output.astype(np.float32) / 255.0))
    summary.seconds = time.perf_counter() - start
    return summary
