"""Image files in and out: PNG/JPEG to float32 arrays in [0, 1], float arrays to rounded PNGs.

Shared by the purify command, the serving and the evaluation code so that every path reads
and writes pixels the same way:

* reading decodes by content, not by extension (the authors' "clean" ImageNet images are JPEG
  data named ``.png``), and divides uint8 values by 255 (16-bit PNGs by 65535);
* writing rounds ``y * 255`` to the nearest integer (the authors' release truncated; see
  ``comdefend_tf.reference.truncate_to_uint8`` to reproduce that) and replaces the file
  atomically, so an interrupted run never leaves half a PNG behind.
"""

from __future__ import annotations

import glob
import os

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class ImageReadError(ValueError):
    """A file that is not a readable image; the message names the file."""


def read_image(path: str, channels: int | None = None) -> np.ndarray:
    """Reads a PNG or JPEG (any file Pillow decodes) as float32 in [0, 1].

    Args:
      path: the image file.
      channels: 3 (RGB; grey images are repeated), 1 (grey, ITU-R 601-2 luma as Pillow computes
        it), or None to keep grey images grey and give everything else RGB. An alpha channel is
        dropped, palettes are expanded.

    Returns:
      float32 ``[height, width, channels]`` in [0, 1]: ``uint8 / 255`` computed as
      ``float32(u8) / float32(255)``.

    Raises:
      FileNotFoundError: no such file.
      ImageReadError: the file is not a decodable image (message names the file).
    """
    from PIL import Image, UnidentifiedImageError

    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no image file at {path!r}")
    try:
        with Image.open(path) as image:
            image.load()
            pixels, scale = _to_array(image, channels)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"cannot read image {path!r}: {error}") from error
    return pixels.astype(np.float32) / np.float32(scale)


def _to_array(image, channels):
    """(integer array [H, W, C], full-scale value) for a loaded Pillow image."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey PNGs decode as 'I;16' or 'I'; keep their precision.
        values = np.asarray(image, dtype=np.int64)
        if values.max(initial=0) > 65535 or values.min(initial=0) < 0:
            raise ValueError(f"integer image values outside 0..65535 (mode {image.mode})")
        return np.repeat(values[..., None], channels or 1, axis=-1), 65535
    is_grey = image.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
    if channels == 1 or (channels is None and is_grey):
        if image.mode == "F":
            raise ValueError("floating-point images are not supported")
        return np.asarray(image.convert("L"), dtype=np.uint8)[..., None], 255
    return np.asarray(image.convert("RGB"), dtype=np.uint8), 255


def to_uint8(image) -> np.ndarray:
    """Rounds float pixels in [0, 1] to uint8: ``clip(round(y * 255), 0, 255)``, same shape."""
    scaled = np.asarray(image, dtype=np.float32) * np.float32(255)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def write_png(path: str, image) -> None:
    """Writes an image as PNG, replacing ``path`` atomically.

    Args:
      path: destination file (its folder must exist).
      image: float ``[height, width, channels]`` in [0, 1] (rounded to uint8) or uint8
        ``[height, width, channels]``; 1 channel writes a grey PNG, 3 an RGB one.
    """
    from PIL import Image

    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3):
        raise ValueError(f"image must be [height, width, 1 or 3], got shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        pixels = to_uint8(pixels)
    pil_image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    folder, name = os.path.split(os.path.abspath(path))
    partial = os.path.join(folder, f".partial.{name}")
    try:
        pil_image.save(partial, format="PNG")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def list_images(pattern: str) -> list[str]:
    """The image files named by ``pattern``, sorted.

    Args:
      pattern: one file (any extension: its content decides), a folder (its ``.png``,
        ``.jpg`` and ``.jpeg`` files, any case, not recursive) or a glob (``photos/*.jpg``;
        ``**`` recurses).

    Raises:
      FileNotFoundError: nothing matches (the message repeats the pattern).
    """
    if os.path.isfile(pattern):
        return [pattern]
    if os.path.isdir(pattern):
        paths = [os.path.join(pattern, name) for name in os.listdir(pattern)
                 if name.lower().endswith(IMAGE_EXTENSIONS)
                 and os.path.isfile(os.path.join(pattern, name))]
        if not paths:
            raise FileNotFoundError(f"folder {pattern!r} holds no {'/'.join(IMAGE_EXTENSIONS)} "
                                    f"files")
        return sorted(paths)
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"no file matches {pattern!r} (expected an image file, a folder "
                                f"or a glob such as 'photos/*.png')")
    return paths


def psnr_db(reference, image, max_value: float = 1.0) -> float:
    """PSNR in dB of ``image`` against ``reference`` (same shape, values in [0, max_value]);
    inf when they are identical."""
    reference = np.asarray(reference, dtype=np.float64)
    image = np.asarray(image, dtype=np.float64)
    if reference.shape != image.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {image.shape}")
    mse = float(np.mean((reference - image) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(max_value ** 2 / mse))
