r"""Runs a corpus of malformed serving requests against an exported ComDefend SavedModel.

    python tools/hostile_requests.py --output=hostile_requests.json
    python tools/hostile_requests.py --export_dir=/abs/exports/comdefend/3 --output=report.json

Without ``--export_dir`` the script exports a tiny RGB purifier with a 16x16 classifier behind
it (library default limits) into a temporary folder. It then loads the export once with
``tf.saved_model.load`` and, in this one process, calls the signatures (``purify``,
``classify``, ``serving_default``, ``purify_bytes``) with every request of the corpus: wrong
ranks (0 to 6), dtypes, empty and huge dimensions, batches over the cap (a million 1x1 images,
ten thousand images declaring 4096x4096), NaN and infinities, values outside [0, 1], wrong
channel counts, bytes that are not PNG/JPEG (GIF, BMP, WebP, TIFF, EPS, PDF, text, base64 left
encoded, empty strings), truncated and corrupt PNGs and JPEGs, PNG headers with a bad length,
type or CRC, PNG IHDRs declaring 20000x20000 or 2**31-1 pixels a side, JPEG SOFs declaring
60000x60000 and 65535x65535. Each malformed case names the keywords the refusal's message must
contain. A few unusual but valid files (16-bit, palette, 1-bit, grey+alpha, RGBA PNGs,
progressive, grey and CMYK JPEGs) must be answered.

Reports: how many cases were refused with ``InvalidArgumentError`` naming the problem, every
other outcome individually, the process's peak RSS (``resource.getrusage``), and whether a valid
request is answered correctly afterwards (the same values as the Keras model, for an export
this script made). Exits 1 when any malformed case is not refused with a naming message, a
valid file is not answered, or the final valid request fails. ``--output`` writes the report as
JSON.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import os
import resource
import struct
import sys
import tempfile
import time
import zlib
from typing import Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402

FLOAT_SIGNATURES = ("purify", "classify", "serving_default")
CLASSIFIER_SIZE = 16


@dataclasses.dataclass
class Case:
    """One request: ``make()`` builds the input value (lazily: large inputs live only while
    their case runs). ``keywords``: what a refusal's message must contain (case-insensitive);
    ``None`` marks a valid request that must be answered, ``check(outputs)`` says whether the
    answer is right."""

    name: str
    signature: str
    make: Callable[[], object]
    keywords: tuple[str, ...] | None
    check: Callable[[dict], bool] | None = None


# ------------------------------------------------------------------------------ file bytes
def _chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    if crc is None:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_with_header(width: int, height: int, depth: int = 8, colour: int = 2,
                    bad_crc: bool = False, idat: bytes | None = None) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` (any 32-bit values), a tiny IDAT and
    IEND: a few dozen bytes, whatever it declares."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    crc = (zlib.crc32(b"IHDR" + ihdr) ^ 0xFF) & 0xFFFFFFFF if bad_crc else None
    data = zlib.compress(b"\x00" * 16) if idat is None else idat
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr, crc) + _chunk(b"IDAT", data) + _chunk(b"IEND",
                                                                                        b"")


def _encode_png(pixels: np.ndarray) -> bytes:
    import tensorflow as tf

    return tf.io.encode_png(pixels).numpy()


def _encode_jpeg(pixels: np.ndarray) -> bytes:
    import tensorflow as tf

    return tf.io.encode_jpeg(pixels, quality=90).numpy()


def _pillow_bytes(mode: str, size: int, format_name: str, **options) -> bytes:
    from PIL import Image

    pixels = np.random.RandomState(size).randint(0, 256, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=format_name, **options)
    return buffer.getvalue()


def _jpeg_with_size(jpeg: bytes, height: int, width: int) -> bytes:
    """``jpeg`` with its baseline SOF0 marker rewritten to declare ``height`` x ``width``."""
    index = jpeg.find(b"\xff\xc0")
    if index < 0:
        raise ValueError("no SOF0 marker")
    data = bytearray(jpeg)
    data[index + 5:index + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _replace_byte(data: bytes, index: int, value: int) -> bytes:
    changed = bytearray(data)
    changed[index] = value
    return bytes(changed)


# ----------------------------------------------------------------------------- the corpus
def float_cases(signature: str, channels: int, max_pixels: int, max_batch_size: int,
                classifier_size: int | None) -> list[Case]:
    """Malformed float requests for one float signature (input ``images``)."""
    import tensorflow as tf

    side = classifier_size or 8
    good_shape = (2, side, side, channels)

    def zeros(shape, dtype=np.float32):
        # Built as a tensor directly: no numpy copy beside it (and numpy refuses the shape of
        # an empty tensor with two 2**31 - 1 sides).
        return lambda: tf.zeros(shape, tf.as_dtype(dtype))

    def filled(value, shape=good_shape):
        return lambda: np.full(shape, value, np.float32)

    def one_bad(value):
        def make():
            images = np.full(good_shape, 0.5, np.float32)
            images[1, side // 2, side // 2, channels - 1] = value
            return images
        return make

    rank = ("rank-4",)
    cases = [
        Case("rank 0 (a scalar)", signature, lambda: np.float32(0.5), rank),
        Case("rank 1", signature, zeros((side,)), rank),
        Case("rank 2", signature, zeros((side, side)), rank),
        Case("rank 3 (one image without batch)", signature, zeros((side, side, channels)),
             rank),
        Case("rank 5", signature, zeros((1, side, side, channels, 1)), rank),
        Case("rank 6", signature, zeros((1, 1, side, side, channels, 1)), rank),
    ]
    wrong_dtype = ("expected to be a float tensor",)
    for dtype in (np.float64, np.float16, np.int32, np.int64, np.uint8, np.uint16, np.bool_,
                  np.complex64):
        cases.append(Case(f"dtype {np.dtype(dtype).name}", signature,
                          zeros(good_shape, dtype), wrong_dtype))
    cases.append(Case("dtype string (encoded PNG bytes sent to a float signature)", signature,
                      lambda: tf.constant([_encode_png(np.zeros((side, side, channels),
                                                                np.uint8))]), wrong_dtype))
    cases.append(Case("dtype bfloat16", signature,
                      lambda: tf.zeros(good_shape, tf.bfloat16), wrong_dtype))
    empty = ("at least one image",)
    for shape in ((0, side, side, channels), (1, 0, side, channels), (1, side, 0, channels),
                  (0, 0, 0, channels), (0, 2 ** 31 - 1, 2 ** 31 - 1, channels),
                  (1, 0, 2 ** 31 - 1, channels)):
        cases.append(Case(f"empty dimension {shape}", signature, zeros(shape), empty))
    for wrong in sorted({0, 1, 2, 4, 1000} - {channels}):
        cases.append(Case(f"{wrong} channels", signature, zeros((1, side, side, wrong)),
                          ("channel(s)",)))
    cases += [
        Case("a million 1x1 images", signature, zeros((1_000_000, 1, 1, channels)),
             ("too many images", "max_batch_size")),
        Case("two million 1x1 images", signature, zeros((2_000_000, 1, 1, channels)),
             ("too many images", "max_batch_size")),
        Case(f"{max_batch_size + 1} images (one over the cap)", signature,
             zeros((max_batch_size + 1, side, side, channels)),
             ("too many images", "max_batch_size")),
    ]
    if classifier_size is None:
        over = max_pixels + 1
        cases += [
            Case(f"one image of {over} pixels (1 x {over})", signature,
                 zeros((1, 1, over, channels)), ("too many pixels", "max_pixels")),
            Case("ten images whose sum exceeds max_pixels", signature,
                 zeros((10, 1, max_pixels // 10 + 1, channels)),
                 ("too many pixels", "max_pixels")),
        ]
    else:
        wrong_size = ("classifier expects",)
        cases += [
            Case("image smaller than the classifier's input", signature,
                 zeros((1, side - 1, side, channels)), wrong_size),
            Case("image larger than the classifier's input", signature,
                 zeros((1, side, side * 4, channels)), wrong_size),
            Case("a huge image for the classifier", signature,
                 zeros((1, 1, max_pixels + 1, channels)), wrong_size),
        ]
    cases += [
        Case("all NaN", signature, filled(np.nan), ("NaN",)),
        Case("one NaN", signature, one_bad(np.nan), ("NaN",)),
        Case("NaN with a negative sign bit", signature, one_bad(-np.nan), ("NaN",)),
        Case("+inf", signature, one_bad(np.inf), ("values in [0, 1]",)),
        Case("-inf", signature, one_bad(-np.inf), ("values in [0, 1]",)),
        Case("all +inf", signature, filled(np.inf), ("values in [0, 1]",)),
        Case("just above 1", signature, one_bad(np.nextafter(np.float32(1), np.float32(2))),
             ("values in [0, 1]",)),
        Case("just below 0", signature, one_bad(-1e-7), ("values in [0, 1]",)),
        Case("8-bit values not divided by 255", signature, filled(255.0),
             ("values in [0, 1]",)),
        Case("negative values", signature, filled(-0.5), ("values in [0, 1]",)),
        Case("float32 max", signature, one_bad(np.finfo(np.float32).max),
             ("values in [0, 1]",)),
        Case("values in [-1, 1]", signature,
             lambda: np.linspace(-1, 1, int(np.prod(good_shape)),
                                 dtype=np.float32).reshape(good_shape), ("values in [0, 1]",)),
    ]
    return cases


def bytes_cases(channels: int, max_pixels: int, max_batch_size: int) -> list[Case]:
    """Malformed and unusual-but-valid requests for ``purify_bytes`` (input ``image_bytes``)."""
    import tensorflow as tf

    signature = "purify_bytes"
    rng = np.random.RandomState(0)
    rgb = rng.randint(0, 256, (6, 5, 3), dtype=np.uint8)
    png = _encode_png(rgb)
    jpeg = _encode_jpeg(rgb)
    one_pixel = _encode_png(np.zeros((1, 1, 3), np.uint8))

    def strings(*items):
        return lambda: tf.constant(list(items), tf.string)

    def repeated(item, count):
        return lambda: tf.constant(np.array([item] * count, dtype=object))

    not_image = ("PNG or JPEG",)
    cases = [
        Case("rank 0 (one string, not a list)", signature, lambda: tf.constant(png),
             ("rank-1",)),
        Case("rank 2", signature, lambda: tf.constant([[png]]), ("rank-1",)),
        Case("rank 3", signature, lambda: tf.constant([[[png, png]]]), ("rank-1",)),
        Case("rank 2 empty", signature, lambda: tf.zeros([0, 3], tf.string), ("rank-1",)),
        Case("empty batch", signature, lambda: tf.zeros([0], tf.string),
             ("at least one encoded image",)),
    ]
    wrong_dtype = ("expected to be a string tensor",)
    for dtype in (np.float32, np.float64, np.int32, np.uint8):
        cases.append(Case(f"dtype {np.dtype(dtype).name} for image_bytes", signature,
                          lambda dtype=dtype: np.zeros((2, 6, 5, 3), dtype), wrong_dtype))
    cases += [
        Case(f"{max_batch_size + 1} valid PNGs (one over the cap)", signature,
             repeated(one_pixel, max_batch_size + 1), ("too many images", "max_batch_size")),
        Case("a million 1x1 PNGs", signature, repeated(one_pixel, 1_000_000),
             ("too many images", "max_batch_size")),
        Case("ten thousand PNGs declaring 4096x4096", signature,
             repeated(png_with_header(4096, 4096), 10_000),
             ("too many images", "max_batch_size")),
        Case("ten thousand JPEGs declaring 4096x4096", signature,
             repeated(_jpeg_with_size(jpeg, 4096, 4096), 10_000),
             ("too many images", "max_batch_size")),
    ]
    # Requests within the batch cap whose declared sizes add up to more than max_pixels.
    side = int(np.sqrt(max_pixels / 2)) + 1
    per_image = max_pixels // max(1, min(max_batch_size, 1000) - 1) + 1
    too_many = ("too many pixels", "declare")
    cases += [
        Case(f"two PNGs declaring {side}x{side} (each under max_pixels, the sum over)",
             signature, strings(png_with_header(side, side), png_with_header(side, side)),
             too_many),
        Case(f"{min(max_batch_size, 1000)} PNGs each declaring 1 x {per_image}", signature,
             repeated(png_with_header(per_image, 1), min(max_batch_size, 1000)), too_many),
        Case("a valid PNG and a JPEG declaring most of the budget twice", signature,
             strings(png, _jpeg_with_size(jpeg, side, side), _jpeg_with_size(jpeg, side, side)),
             too_many),
        Case("69-byte PNG declaring 20000x20000", signature,
             strings(png_with_header(20000, 20000)), too_many + ("20000",)),
        Case("PNG declaring 20000x20000 16-bit RGBA", signature,
             strings(png_with_header(20000, 20000, depth=16, colour=6)), too_many),
        Case("PNG declaring 2**31-1 x 2**31-1", signature,
             strings(png_with_header(2 ** 31 - 1, 2 ** 31 - 1)), too_many),
        Case("PNG declaring 1 x 2**31-1", signature, strings(png_with_header(1, 2 ** 31 - 1)),
             too_many),
        Case("PNG declaring 4097x4097", signature, strings(png_with_header(4097, 4097)),
             too_many),
        Case("JPEG SOF declaring 60000x60000", signature,
             strings(_jpeg_with_size(jpeg, 60000, 60000)), too_many),
        Case("JPEG SOF declaring 65535x65535", signature,
             strings(_jpeg_with_size(jpeg, 65535, 65535)), ("JPEG",)),
        Case("JPEG SOF declaring 65535x1", signature,
             strings(_jpeg_with_size(jpeg, 65535, 1)), ("JPEG",)),
        Case("JPEG SOF declaring height 0", signature, strings(_jpeg_with_size(jpeg, 0, 5)),
             ("JPEG",)),
        Case("valid PNG followed by one declaring 20000x20000", signature,
             strings(png, png_with_header(20000, 20000)), too_many),
    ]
    bad_header = {
        "PNG truncated to its 8-byte signature": (png[:8], ("truncated PNG",)),
        "PNG truncated to 12 bytes": (png[:12], ("truncated PNG",)),
        "PNG truncated to 16 bytes": (png[:16], ("truncated PNG",)),
        "PNG truncated to 20 bytes": (png[:20], ("truncated PNG",)),
        "PNG truncated to 24 bytes": (png[:24], ("truncated PNG",)),
        "PNG truncated to 29 bytes (no IHDR CRC)": (png[:29], ("truncated PNG",)),
        "PNG truncated to 32 bytes": (png[:32], ("truncated PNG",)),
        "PNG IHDR length 14": (_replace_byte(png, 11, 14), ("13-byte IHDR",)),
        "PNG IHDR length 0x8000000d": (_replace_byte(png, 8, 0x80), ("13-byte IHDR",)),
        "PNG first chunk lower-case ihdr": (png[:12] + b"ihdr" + png[16:], ("IHDR",)),
        "PNG first chunk IDAT": (PNG_SIGNATURE + _chunk(b"IDAT", b"x" * 13) + png[33:],
                                 ("IHDR",)),
        "PNG IHDR CRC flipped": (_replace_byte(png, 30, png[30] ^ 0xFF), ("CRC",)),
        "PNG width changed, CRC not updated": (_replace_byte(png, 19, png[19] ^ 1), ("CRC",)),
        "PNG IHDR CRC zeroed": (png[:29] + b"\x00\x00\x00\x00" + png[33:], ("CRC",)),
        "PNG bad CRC declaring 20000x20000": (png_with_header(20000, 20000, bad_crc=True),
                                              ("CRC",)),
        "PNG width 0": (png_with_header(0, 5), ("width or height",)),
        "PNG height 0": (png_with_header(5, 0), ("width or height",)),
        "PNG width 2**31": (png_with_header(2 ** 31, 5), ("width or height",)),
        "PNG width 2**32-1": (png_with_header(2 ** 32 - 1, 2 ** 32 - 1), ("width or height",)),
    }
    for name, (data, keywords) in bad_header.items():
        cases.append(Case(name, signature, strings(data), keywords))
    pixels_16 = rng.randint(0, 65536, (6, 5, 3)).astype(np.uint16)
    corrupt_png = {
        "PNG truncated after IHDR": png[:33],
        "PNG truncated mid-IDAT": png[:len(png) - 20],
        "PNG without IEND, IDAT cut": png[:-16],
        "PNG IDAT byte flipped (bad chunk CRC)": _replace_byte(png, png.find(b"IDAT") + 6,
                                                               png[png.find(b"IDAT") + 6] ^ 0xFF),
        "PNG IDAT too short for the declared size": png_with_header(64, 64),
        "PNG IDAT not zlib": png_with_header(4, 4, idat=b"garbage!!"),
        "PNG with no IDAT": png[:33] + _chunk(b"IEND", b""),
        "PNG bit depth 3": png_with_header(4, 4, depth=3),
        "PNG colour type 7": png_with_header(4, 4, colour=7),
        "PNG palette without PLTE": png_with_header(4, 4, colour=3),
        "PNG declaring 8x8 with data for 6x5": PNG_SIGNATURE + _chunk(
            b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)) + png[33:],
        "16-bit PNG truncated": _encode_png(pixels_16)[:60],
    }
    for name, data in corrupt_png.items():
        cases.append(Case(name, signature, strings(data), ("PNG",)))
    corrupt_jpeg = {
        "JPEG SOI only": jpeg[:2] + b"\xff",
        "JPEG first 4 bytes": jpeg[:4],
        "JPEG cut in half": jpeg[:len(jpeg) // 2],
        "JPEG without EOI, last scan cut": jpeg[:-40],
        "JPEG SOI then garbage": b"\xff\xd8\xff\xe0 garbage garbage garbage",
        "JPEG SOI then zeros": b"\xff\xd8\xff" + b"\x00" * 200,
        "JPEG header of another JPEG's size only": jpeg[:jpeg.find(b"\xff\xda")],
    }
    for name, data in corrupt_jpeg.items():
        cases.append(Case(name, signature, strings(data), ("JPEG",)))
    other_formats = {
        "empty string": b"",
        "one zero byte": b"\x00",
        "whitespace": b"   \n\t",
        "plain text": b"hello, this is not an image",
        "JSON": b'{"b64": "iVBORw0KGgo="}',
        "HTML": b"<html><body><img src=x onerror=alert(1)></body></html>",
        "base64 text of a PNG (not decoded by the client)": base64.b64encode(png),
        "data URL": b"data:image/png;base64," + base64.b64encode(png),
        "GIF89a": _pillow_bytes("P", 6, "GIF"),
        "GIF87a header": b"GIF87a" + b"\x00" * 20,
        "BMP": _pillow_bytes("RGB", 6, "BMP"),
        "WebP": _pillow_bytes("RGB", 6, "WEBP"),
        "TIFF": _pillow_bytes("RGB", 6, "TIFF"),
        "ICO": _pillow_bytes("RGB", 16, "ICO"),
        "EPS (PostScript, would reach Ghostscript in Pillow)":
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 20000 20000\nshowpage\n",
        "PDF": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
        "SVG": b'<svg xmlns="http://www.w3.org/2000/svg" width="20000" height="20000"/>',
        "PNG signature with one byte changed": _replace_byte(png, 1, ord("Q")),
        "PNG without its signature": png[8:],
        "JPEG 2000 codestream": b"\xff\x4f\xff\x51" + b"\x00" * 40,
        "JPEG with a 2-byte SOI only": b"\xff\xd8",
        "gzip of a PNG": zlib.compress(png),
        "NUL bytes": b"\x00" * 64,
        "random bytes": rng.randint(0, 256, 256, dtype=np.uint8).tobytes(),
    }
    for name, data in other_formats.items():
        cases.append(Case(name, signature, strings(data), not_image))
    cases += [
        Case("a valid PNG and an empty string", signature, strings(png, b""), not_image),
        Case("a valid JPEG and a GIF", signature, strings(jpeg, _pillow_bytes("P", 6, "GIF")),
             not_image),
        Case("a valid PNG and a truncated PNG", signature, strings(png, png[:20]),
             ("truncated PNG",)),
        Case("a valid PNG and a corrupt JPEG", signature, strings(png, jpeg[:len(jpeg) // 2]),
             ("JPEG",)),
    ]

    # Unusual but valid files: answered with a PNG of the declared size and the model's
    # channel count.
    def answered(height, width, count=1):
        def check(outputs):
            import tensorflow as tf_

            pngs = outputs["purified_png_bytes"].numpy()
            return len(pngs) == count and all(
                tuple(tf_.io.decode_png(item).shape) == (height, width, channels)
                for item in pngs)
        return check

    valid = {
        "16-bit RGB PNG": (_encode_png(pixels_16), 6, 5),
        "16-bit grey PNG": (_encode_png(pixels_16[..., :1]), 6, 5),
        "8-bit grey PNG": (_encode_png(rgb[..., :1]), 6, 5),
        "grey+alpha PNG": (_encode_png(rgb[..., :2]), 6, 5),
        "RGBA PNG": (_encode_png(np.concatenate([rgb, rgb[..., :1]], -1)), 6, 5),
        "16-bit grey+alpha PNG": (_encode_png(pixels_16[..., :2]), 6, 5),
        "palette PNG": (_pillow_bytes("P", 7, "PNG"), 7, 7),
        "1-bit PNG": (_pillow_bytes("1", 7, "PNG"), 7, 7),
        "baseline JPEG": (jpeg, 6, 5),
        "progressive JPEG": (_pillow_bytes("RGB", 8, "JPEG", progressive=True), 8, 8),
        "grey JPEG": (_pillow_bytes("L", 8, "JPEG"), 8, 8),
        "CMYK JPEG": (_pillow_bytes("CMYK", 8, "JPEG"), 8, 8),
        "1x1 PNG": (one_pixel, 1, 1),
    }
    for name, (data, height, width) in valid.items():
        cases.append(Case(name, signature, strings(data), None, answered(height, width)))
    cases.append(Case("a batch of a PNG, a JPEG and a 16-bit PNG", signature,
                      strings(png, jpeg, _encode_png(pixels_16)), None, answered(6, 5, 3)))
    return cases


def build_corpus(channels: int, max_pixels: int, max_batch_size: int,
                 classifier_size: int | None, signatures) -> list[Case]:
    """Every case for the signatures present (``classify`` and ``serving_default`` take
    ``classifier_size`` x ``classifier_size`` images when a classifier was exported)."""
    cases = []
    for signature in FLOAT_SIGNATURES:
        if signature not in signatures:
            continue
        if signature == "purify" or classifier_size is None:
            size = None
        else:
            size = classifier_size
        cases += float_cases(signature, channels, max_pixels, max_batch_size, size)
    cases += bytes_cases(channels, max_pixels, max_batch_size)
    return cases


# ------------------------------------------------------------------------------ running
def input_name(signature: str) -> str:
    return "image_bytes" if signature == "purify_bytes" else "images"


def run_case(signatures, case: Case) -> dict:
    """Runs one case; returns ``{"name", "signature", "outcome", "message", "seconds"}`` with
    outcome ``refused_named``, ``refused_unnamed``, ``other_error``, ``accepted`` (a malformed
    request answered), ``answered`` (a valid one answered correctly) or ``wrong_answer``."""
    import tensorflow as tf

    start = time.perf_counter()
    result = {"name": case.name, "signature": case.signature, "message": ""}
    try:
        value = case.make()
        if not tf.is_tensor(value):
            value = tf.constant(value)
        result["input_bytes"] = _tensor_bytes(value)
        outputs = signatures[case.signature](**{input_name(case.signature): value})
        del value
        if case.keywords is None:
            result["outcome"] = "answered" if case.check(outputs) else "wrong_answer"
        else:
            result["outcome"] = "accepted"
    except tf.errors.InvalidArgumentError as error:
        message = error.message
        result["message"] = message[-600:]
        if case.keywords is None:
            result["outcome"] = "refused_valid"
        elif all(keyword.lower() in message.lower() for keyword in case.keywords):
            result["outcome"] = "refused_named"
        else:
            result["outcome"] = "refused_unnamed"
            result["expected_keywords"] = list(case.keywords)
    except Exception as error:  # everything else is reported, never allowed to stop the run
        result["outcome"] = "other_error"
        result["message"] = f"{type(error).__name__}: {error}"[-600:]
    result["seconds"] = round(time.perf_counter() - start, 3)
    result["peak_rss_after_bytes"] = peak_rss_bytes()
    return result


def _tensor_bytes(value) -> int:
    """Memory the request's input tensor holds in this process (strings: their bytes plus
    TensorFlow's 24-byte string headers)."""
    import tensorflow as tf

    if value.dtype == tf.string:
        return int(tf.reduce_sum(tf.strings.length(value))) + 24 * int(tf.size(value))
    return int(tf.size(value)) * value.dtype.size


GOOD_OUTCOMES = ("refused_named", "answered")


def peak_rss_bytes() -> int:
    """The process's peak resident set size (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_export(folder: str, channels: int = 3, settings=None):
    """Exports a tiny purifier (``channels`` channels) with a 16x16 classifier into
    ``folder``; returns ``(version_dir, purifier, classifier, settings)``."""
    import keras

    from comdefend_tf import ComDefend, get_config
    from comdefend_tf.serving import signatures as serving

    purifier = ComDefend(get_config("tiny", input_channels=channels), seed=5)
    classifier = keras.Sequential([
        keras.Input((CLASSIFIER_SIZE, CLASSIFIER_SIZE, channels)),
        keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10)], name="hostile_corpus_classifier")
    settings = settings or serving.ExportSettings()
    version_dir = serving.export_savedmodel(purifier, folder, classifier=classifier,
                                            settings=settings)
    return version_dir, purifier, classifier, settings


def valid_request_check(signatures, channels: int, purifier=None, classifier=None) -> dict:
    """A valid request to every signature after the corpus: answered, and (when the Keras
    models are at hand) equal to them."""
    import tensorflow as tf

    images = np.random.RandomState(1).rand(3, CLASSIFIER_SIZE, CLASSIFIER_SIZE,
                                           channels).astype(np.float32)
    report = {}
    purified = signatures["purify"](images=tf.constant(images))["purified"].numpy()
    report["purify_shape_ok"] = purified.shape == images.shape
    if purifier is not None:
        report["purify_max_abs_error_vs_keras"] = float(
            np.abs(purified - np.asarray(purifier(images))).max())
    if "classify" in signatures:
        outputs = signatures["classify"](images=tf.constant(images))
        probabilities = outputs["probabilities"].numpy()
        report["classify_sums_to_one"] = bool(np.allclose(probabilities.sum(axis=1), 1,
                                                          atol=1e-5))
        if classifier is not None and purifier is not None:
            expected = tf.nn.softmax(classifier(purifier(images))).numpy()
            report["classify_max_abs_error_vs_keras"] = float(
                np.abs(probabilities - expected).max())
    pngs = [tf.io.encode_png(tf.cast(tf.round(image * 255), tf.uint8)).numpy()
            for image in images]
    answered = signatures["purify_bytes"](image_bytes=tf.constant(pngs))
    decoded = [tf.io.decode_png(item).shape for item in answered["purified_png_bytes"].numpy()]
    report["purify_bytes_ok"] = decoded == [images.shape[1:]] * len(images)
    report["ok"] = (report["purify_shape_ok"] and report["purify_bytes_ok"]
                    and report.get("purify_max_abs_error_vs_keras", 0.0) < 1e-4
                    and report.get("classify_sums_to_one", True)
                    and report.get("classify_max_abs_error_vs_keras", 0.0) < 1e-4)
    return report


def run_corpus(signatures, cases: list[Case]) -> list[dict]:
    return [run_case(signatures, case) for case in cases]


def summarize(results: list[dict]) -> dict:
    counts = {}
    for result in results:
        counts[result["outcome"]] = counts.get(result["outcome"], 0) + 1
    malformed = [result for result in results if result["outcome"] not in ("answered",
                                                                            "wrong_answer",
                                                                            "refused_valid")]
    largest = max(results, key=lambda result: result.get("input_bytes", 0))
    return {"cases": len(results), "malformed_cases": len(malformed),
            "largest_request_input_bytes": largest.get("input_bytes", 0),
            "largest_request": f"{largest['signature']}: {largest['name']}",
            "refused_with_naming_message": counts.get("refused_named", 0),
            "valid_files_answered": counts.get("answered", 0),
            "outcome_counts": counts,
            "not_as_expected": [result for result in results
                                if result["outcome"] not in GOOD_OUTCOMES]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export_dir", help="An exported version folder (EXPORT_BASE/N) to "
                        "attack; default: export a tiny purifier and classifier to a temporary "
                        "folder with the library's default limits.")
    parser.add_argument("--channels", type=int, default=3, help="Channels of the tiny export.")
    parser.add_argument("--output", help="Write the report as JSON here.")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="hostile_requests_") as folder:
        purifier = classifier = None
        if args.export_dir:
            version_dir = args.export_dir
            with open(os.path.join(version_dir, "comdefend_export.json")) as handle:
                metadata = json.load(handle)
            channels = metadata["comdefend_config"]["input_channels"]
            max_pixels = metadata["settings"]["max_pixels"]
            max_batch_size = metadata["settings"]["max_batch_size"]
        else:
            version_dir, purifier, classifier, settings = build_export(folder, args.channels)
            channels, max_pixels = args.channels, settings.max_pixels
            max_batch_size = settings.max_batch_size
        loaded = tf.saved_model.load(version_dir)
        signatures = loaded.signatures
        classifier_size = None
        if "classify" in signatures:
            with open(os.path.join(version_dir, "comdefend_export.json")) as handle:
                height_width = json.load(handle).get("classifier_height_width")
            if height_width and height_width[0] == height_width[1]:
                classifier_size = height_width[0]
        rss_after_load = current_rss_bytes()
        peak_before = peak_rss_bytes()
        cases = build_corpus(channels, max_pixels, max_batch_size, classifier_size, signatures)
        results = run_corpus(signatures, cases)
        valid = valid_request_check(signatures, channels, purifier, classifier)
    summary = summarize(results)
    report = {
        "export": version_dir if args.export_dir else "tiny export in a temporary folder",
        "limits": {"max_pixels": max_pixels, "max_batch_size": max_batch_size},
        **summary,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_before_corpus_bytes": peak_before,
        "rss_after_load_bytes": rss_after_load,
        "rss_at_end_bytes": current_rss_bytes(),
        "valid_request_after_corpus": valid,
        "seconds": round(time.time() - started, 1),
        "results": results,
    }
    ok = not summary["not_as_expected"] and valid["ok"]
    report["ok"] = ok
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=2)
    print(f"cases: {summary['cases']} ({summary['malformed_cases']} malformed, "
          f"{summary['cases'] - summary['malformed_cases']} valid)")
    print(f"refused with InvalidArgumentError naming the problem: "
          f"{summary['refused_with_naming_message']} / {summary['malformed_cases']}")
    print(f"valid unusual files answered: {summary['valid_files_answered']}")
    for result in summary["not_as_expected"]:
        print(f"NOT AS EXPECTED [{result['outcome']}] {result['signature']}: {result['name']}: "
              f"{result['message'][-300:]}")
    print(f"peak RSS: {report['peak_rss_bytes'] / 2 ** 20:.0f} MiB (after loading the export: "
          f"{peak_before / 2 ** 20:.0f} MiB peak, {rss_after_load / 2 ** 20:.0f} MiB resident; "
          f"the largest request input held here: "
          f"{summary['largest_request_input_bytes'] / 2 ** 20:.0f} MiB, "
          f"{summary['largest_request']})")
    print(f"valid request afterwards: {'answered correctly' if valid['ok'] else 'FAILED'} "
          f"{json.dumps({k: v for k, v in valid.items() if k != 'ok'})}")
    print(f"result: {'OK' if ok else 'FAILED'} ({report['seconds']} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
