"""Image files in and out: bounded reading of PNG/JPEG to float32 in [0, 1], rounded PNG writes.

``read_image(path, channels, max_pixels, max_bytes)`` -> float32 ``[height, width, channels]``
in [0, 1] (8-bit / 255, 16-bit PNG / 65535; alpha dropped; EXIF orientation applied), the
file's size, its declared pixels and the data they need (``headers.check_payload``: decoding
work bounded per byte of input, truncated JPEG scans refused) checked before any decoding;
refusals raise
``ImageReadError`` and its subclasses ``ImageTooLargeError`` and ``UnsupportedFormatError``
(from ``comdefend_tf.io.headers``), ``FileNotFoundError`` for a missing file.
``write_png(path, image, replace=True)`` rounds ``y * 255`` to uint8 and publishes ``path``
atomically, replacing what is there or, with ``replace=False``, raising ``FileExistsError``.
Decoding is TensorFlow's, the serving signatures' decoders; docs/internals/io.md has the rules
in full and why.
"""

from __future__ import annotations

import io

import numpy as np

from comdefend_tf.io import bounded, headers
from comdefend_tf.io.atomic import write_bytes_atomic
from comdefend_tf.io.headers import ImageReadError, ImageTooLargeError, UnsupportedFormatError

# Defaults of the reading limits (the purify command's --max_image_pixels, --max_file_bytes).
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_BYTES = 512 * 2**20


__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS", "ImageReadError", "ImageTooLargeError",
           "UnsupportedFormatError", "apply_orientation", "decode_image", "psnr_db",
           "read_bounded", "read_image", "to_uint8", "write_png"]


def read_image(path: str, channels: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Reads a PNG or JPEG file as float32 in [0, 1], upright per its EXIF orientation.

    Args:
      path: the image file.
      channels: 3 (RGB; grey images are repeated), 1 (grey), or None to keep grey images grey
        and give everything else RGB. Alpha is dropped, palettes are expanded
        (docs/internals/io.md).
      max_pixels: refuse images declaring more than this many pixels (height x width).
      max_bytes: refuse files larger than this many bytes, before reading them.

    Returns:
      float32 ``[height, width, channels]`` in [0, 1]: 8-bit values / 255, 16-bit PNG values
      / 65535 (``float32(v) / float32(255)``, bit-identical to ``tf.io.decode_png(data,
      dtype=tf.uint16) / 65535``).

    Raises:
      FileNotFoundError: no such file.
      ImageTooLargeError: the file or its declared pixel count is over the limit.
      UnsupportedFormatError: the data is not PNG or JPEG.
      ImageReadError: anything else that makes the file unreadable (the message names it).
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    data = read_bounded(path, max_bytes)
    return decode_image(data, channels=channels, max_pixels=max_pixels, name=path)


def read_bounded(path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` bytes (``io.bounded``: one read,
    type and size checked on the open descriptor, non-blocking so a FIFO cannot hang it).

    Raises:
      FileNotFoundError: no such file.
      ImageTooLargeError: more than ``max_bytes`` bytes.
      ImageReadError: not a regular file, or not readable (permissions, I/O error).
    """
    try:
        return bounded.read_regular_file(path, max_bytes)
    except FileNotFoundError:
        raise FileNotFoundError(f"no image file at {path!r}") from None
    except bounded.NotRegularFileError:
        raise ImageReadError(f"{path!r} is not a regular file") from None
    except bounded.FileTooLargeError as error:
        if error.grew:
            raise ImageTooLargeError(f"{path!r} grew past the limit of {max_bytes:,} bytes "
                                     f"while it was read") from None
        raise ImageTooLargeError(f"{path!r} is {error.size:,} bytes, more than the limit of "
                                 f"{max_bytes:,} bytes") from None
    except bounded.FileReadError as error:
        raise ImageReadError(f"cannot read {path!r}: {error.error.strerror or error.error}"
                             ) from error.error
    except OSError as error:
        raise ImageReadError(f"cannot open {path!r}: {error.strerror or error}") from error


def decode_image(data: bytes, channels: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 name: str = "<bytes>") -> np.ndarray:
    """Decodes PNG or JPEG bytes as ``read_image`` does (same rules, same errors), with the
    pixel limit checked on the declared size before decoding, then the data against what the
    header declares (``headers.check_payload``): a PNG whose IDAT bytes cannot inflate to its
    pixels (over ``headers.PNG_MAX_INFLATE_RATIO`` = 1,032 bytes per byte), a JPEG cut inside a
    scan or without its end-of-image marker, a scan shorter than its blocks need, more than
    ``headers.MAX_JPEG_SCANS`` scans, or more than ``headers.MAX_JPEG_PIXELS_PER_SCAN_BYTE``
    (1,024) declared pixels per byte of scan data: ``ImageReadError``, nothing decoded."""
    import tensorflow as tf

    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    header = headers.read_header(data, name)
    if header.height * header.width > max_pixels:
        raise ImageTooLargeError(
            f"{name!r} declares {header.width}x{header.height} = "
            f"{header.width * header.height:,} pixels, more than the limit of {max_pixels:,}")
    headers.check_payload(data, header, name)
    out_channels = channels or (1 if header.grey else 3)
    try:
        if header.format == "PNG":
            decoded, scale = tf.io.decode_png(data, channels=out_channels, dtype=tf.uint16), 65535
        else:
            decoded, scale = tf.io.decode_jpeg(data, channels=out_channels), 255
        pixels = decoded.numpy()
    except tf.errors.OpError as error:
        raise ImageReadError(f"{name!r}: corrupt or truncated {header.format} "
                             f"({headers.tf_message(error)})") from None
    del decoded
    if pixels.shape != (header.height, header.width, out_channels):
        raise ImageReadError(f"{name!r}: decoded shape {pixels.shape} differs from the declared "
                             f"{header.height}x{header.width}")
    image = pixels.astype(np.float32)
    del pixels
    image /= np.float32(scale)
    return apply_orientation(image, headers.exif_orientation(data))


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """``[height, width, channels]`` turned upright for an EXIF orientation 1..8 (as
    ``PIL.ImageOps.exif_transpose``: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90
    clockwise, 7 transverse, 8 rotate 90 anticlockwise); a new contiguous array unless 1."""
    turned = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
        8: lambda a: np.rot90(a, 1),
    }[orientation](image)
    return turned if orientation == 1 else np.ascontiguousarray(turned)


def to_uint8(image) -> np.ndarray:
    """Rounds float pixels in [0, 1] to uint8: ``clip(round(y * 255), 0, 255)``, same shape.

    One float32 temporary the size of the image, whatever its size."""
    scaled = np.multiply(np.asarray(image), np.float32(255), dtype=np.float32)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def encode_png(image) -> bytes:
    """PNG bytes of float ``[height, width, channels]`` in [0, 1] (rounded to uint8) or uint8
    ``[height, width, channels]``; 1 channel gives a grey PNG, 3 an RGB one."""
    from PIL import Image

    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3):
        raise ValueError(f"image must be [height, width, 1 or 3], got shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        pixels = to_uint8(pixels)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer,
                                                                              format="PNG")
    return buffer.getvalue()


def write_png(path: str, image, replace: bool = True) -> None:
    """Writes :func:`encode_png`'s bytes to ``path`` atomically (``io.atomic``: a planted file
    or link at the temporary name is never written through; a link at ``path`` is replaced,
    not its target). ``path``'s folder must exist.

    Raises:
      FileExistsError: ``replace`` is False and anything (a file, a link, a folder) stands at
        ``path`` when the file is published; nothing is changed there.
    """
    write_bytes_atomic(path, encode_png(image), replace=replace)


def psnr_db(reference, image, max_value: float = 1.0) -> float:
    """PSNR in dB of ``image`` against ``reference`` (same shape, values in [0, max_value]);
    inf when they are identical. Summed in float64 over chunks of a million values, so the
    memory it needs does not grow with the image."""
    reference, image = np.asarray(reference), np.asarray(image)
    if reference.shape != image.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {image.shape}")
    if reference.size == 0:
        raise ValueError("psnr_db of an empty image")
    flat_reference, flat_image = reference.reshape(-1), image.reshape(-1)
    squared_error, chunk = 0.0, 1 << 20
    for start in range(0, flat_reference.size, chunk):
        difference = (flat_reference[start:start + chunk].astype(np.float64)
                      - flat_image[start:start + chunk].astype(np.float64))
        squared_error += float(np.dot(difference, difference))
    mse = squared_error / reference.size
    return float("inf") if mse == 0 else float(10.0 * np.log10(max_value ** 2 / mse))
