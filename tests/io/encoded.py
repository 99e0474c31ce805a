"""Encoded images written by hand for the io tests: PNG chunks, 16-bit PNGs, a PNG bomb, and
tf.train.Example records built without the library's schema module."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def save(path, pixels, format=None, mode=None) -> str:
    """Writes ``pixels`` with Pillow (format from the name unless given); returns the path."""
    Image.fromarray(pixels, mode=mode).save(path, format=format)
    return str(path)


def chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data and the CRC of type and data."""
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def raw_png(values: np.ndarray, colour_type: int, bit_depth: int = 16,
            extra: bytes = b"") -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit colour): ``values`` [h, w, samples]."""
    height, width = values.shape[:2]
    sample = ">u2" if bit_depth == 16 else "u1"
    rows = b"".join(b"\x00" + values[row].astype(sample).tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def bomb_png() -> bytes:
    """69 bytes declaring 20000x20000 RGB pixels (1.2 GB decoded)."""
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def png_bytes(pixels: np.ndarray) -> bytes:
    """Pillow's PNG encoding of uint8 ``pixels`` ([h, w] grey or [h, w, 3] RGB)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def example(encoded: bytes, label: int | None = None, shape=None) -> bytes:
    """A serialized tf.train.Example with ``image/encoded`` and, if given, the label and
    ``image/height``, ``image/width``, ``image/channels``."""
    import tensorflow as tf

    feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded]))}
    if label is not None:
        feature["image/class/label"] = tf.train.Feature(int64_list=tf.train.Int64List(
            value=[label]))
    if shape is not None:
        for name, value in zip(("height", "width", "channels"), shape):
            feature[f"image/{name}"] = tf.train.Feature(int64_list=tf.train.Int64List(
                value=[value]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
