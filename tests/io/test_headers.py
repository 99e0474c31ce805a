"""The two header parsers, Python (io.headers) and in-graph (io.graph_headers), read one corpus
of encoded images alike: the same declared sizes, the same refusals; and EXIF orientation."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from comdefend_tf.io import graph_headers, headers
from comdefend_tf.io import images as image_io
from tests.fixtures.hostile_requests import png_with_header
from tests.io.encoded import chunk, raw_png


def _pillow(pixels, format, mode=None, **options) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    if mode:
        image = image.convert(mode)
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _with_byte(data: bytes, index: int, value: int) -> bytes:
    changed = bytearray(data)
    changed[index] = value
    return bytes(changed)


def _jpeg_declaring(jpeg: bytes, height: int, width: int) -> bytes:
    data = bytearray(jpeg)
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _corpus() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    png = _pillow(rgb, "PNG")
    jpeg = _pillow(rgb, "JPEG")
    palette = Image.fromarray(rng.integers(0, 3, (5, 6), dtype=np.uint8), mode="P")
    palette.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90])
    palette_bytes = io.BytesIO()
    palette.save(palette_bytes, format="PNG", transparency=1)
    return {
        "8-bit RGB PNG": png,
        "8-bit grey PNG": _pillow(rgb[..., 0], "PNG"),
        "1-bit grey PNG": _pillow(rgb[..., 0] > 127, "PNG"),
        "16-bit grey PNG": raw_png(rng.integers(0, 65536, (4, 5, 1)), 0, 16),
        "16-bit grey+alpha PNG": raw_png(rng.integers(0, 65536, (4, 5, 2)), 4, 16),
        "16-bit RGB PNG": raw_png(rng.integers(0, 65536, (4, 5, 3)), 2, 16),
        "16-bit RGBA PNG": raw_png(rng.integers(0, 65536, (4, 5, 4)), 6, 16),
        "8-bit grey+alpha PNG": raw_png(rng.integers(0, 256, (3, 8, 2)), 4, 8),
        "8-bit RGBA PNG": raw_png(rng.integers(0, 256, (3, 8, 4)), 6, 8),
        "palette PNG with tRNS": palette_bytes.getvalue(),
        "PNG with eXIf before IDAT": raw_png(rng.integers(0, 256, (2, 3, 1)), 0, 8,
                                             extra=chunk(b"eXIf", b"MM\x00*\x00\x00\x00\x08")),
        "baseline JPEG": jpeg,
        "progressive JPEG": _pillow(rgb, "JPEG", progressive=True),
        "grey JPEG": _pillow(rgb[..., 0], "JPEG"),
        "CMYK JPEG": _pillow(rgb, "JPEG", mode="CMYK"),
        "JPEG cut after its header": jpeg[:jpeg.index(b"\xff\xda") + 2],
        "JPEG declaring 60000x60000": _jpeg_declaring(jpeg, 60000, 60000),
        "JPEG declaring 65535x65535 (over libjpeg's limit)": _jpeg_declaring(jpeg, 65535, 65535),
        "JPEG declaring height 0": _jpeg_declaring(jpeg, 0, 5),
        "JPEG SOI then garbage": b"\xff\xd8\xff\xe0 garbage garbage garbage",
        "JPEG first 4 bytes": jpeg[:4],
        "PNG truncated to its signature": png[:8],
        "PNG truncated to 20 bytes": png[:20],
        "PNG truncated to 32 bytes (IHDR CRC cut)": png[:32],
        "PNG IHDR CRC flipped": _with_byte(png, 30, png[30] ^ 0xFF),
        "PNG width changed, CRC not updated": _with_byte(png, 19, png[19] ^ 1),
        "PNG bad CRC declaring 20000x20000": png_with_header(20000, 20000, bad_crc=True),
        "PNG IHDR length 14": _with_byte(png, 11, 14),
        "PNG first chunk IDAT": b"\x89PNG\r\n\x1a\n" + chunk(b"IDAT", b"x" * 13) + png[33:],
        "PNG first chunk lower-case ihdr": png[:12] + b"ihdr" + png[16:],
        "PNG declaring 20000x20000": png_with_header(20000, 20000),
        "16-bit RGBA PNG declaring 20000x20000": png_with_header(20000, 20000, depth=16,
                                                                 colour=6),
        "PNG declaring 2**31-1 x 1": png_with_header(2 ** 31 - 1, 1),
        "PNG declaring width 2**31": png_with_header(2 ** 31, 5),
        "PNG declaring 2**32-1 squared": png_with_header(2 ** 32 - 1, 2 ** 32 - 1),
        "PNG width 0": png_with_header(0, 5),
        "PNG height 0": png_with_header(5, 0),
        "PNG bit depth 3": png_with_header(4, 4, depth=3),
        "PNG colour type 7": png_with_header(4, 4, colour=7),
        "GIF": _pillow(rgb, "GIF"),
        "BMP": _pillow(rgb, "BMP"),
        "WebP": _pillow(rgb, "WEBP"),
        "EPS": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n",
        "empty": b"",
        "text": b"hello, not an image",
    }


# The Python reader is stricter at the header in these cases, by design: the graph path
# leaves a bad depth or colour type to the PNG decoder (which refuses it), and converts CMYK
# JPEGs, which the purify command refuses (``read_header(allow_cmyk=True)`` accepts them).
PYTHON_ONLY_REFUSALS = {"PNG bit depth 3": "decoder", "PNG colour type 7": "decoder",
                        "CMYK JPEG": "cmyk"}

CORPUS = _corpus()


def _python_outcome(data: bytes, allow_cmyk: bool = False):
    try:
        header = headers.read_header(data, "x", allow_cmyk=allow_cmyk)
    except headers.ImageReadError as error:
        return ("refused", type(error).__name__)
    return ("size", header.height, header.width)


_graph_sizes = tf.function(graph_headers.declared_sizes,
                           input_signature=[tf.TensorSpec([None], tf.string)])


def _graph_outcome(data: bytes):
    try:
        heights, widths, _ = _graph_sizes(tf.constant([data]))
    except tf.errors.InvalidArgumentError as error:
        return ("refused", error.message.split("\n")[0][-160:])
    return ("size", int(heights[0]), int(widths[0]))


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_python_and_graph_parsers_agree(name):
    data = CORPUS[name]
    python, graph = _python_outcome(data), _graph_outcome(data)
    if name not in PYTHON_ONLY_REFUSALS:
        assert python[0] == graph[0], (python, graph)
        if python[0] == "size":
            assert python == graph
        return
    assert python[0] == "refused", python
    if PYTHON_ONLY_REFUSALS[name] == "cmyk":
        assert graph == _python_outcome(data, allow_cmyk=True) and graph[0] == "size"
    else:  # the header passes in the graph; the decoder then refuses the image
        assert graph[0] == "size", graph
        with pytest.raises(tf.errors.InvalidArgumentError):
            graph_headers.decode_image_bytes(tf.constant(data), 3)


def test_the_corpus_covers_acceptance_and_refusal():
    outcomes = {name: _python_outcome(data)[0] for name, data in CORPUS.items()}
    assert list(outcomes.values()).count("size") >= 15
    assert list(outcomes.values()).count("refused") >= 20


def test_graph_parser_reads_a_batch_and_names_the_first_bad_element():
    batch = [CORPUS["8-bit RGB PNG"], CORPUS["baseline JPEG"], CORPUS["16-bit RGB PNG"]]
    heights, widths, is_png = _graph_sizes(tf.constant(batch))
    assert list(zip(heights.numpy(), widths.numpy())) == [(9, 7), (9, 7), (4, 5)]
    assert is_png.numpy().tolist() == [True, False, True]
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"element\] \[1\] \[is a corrupt PNG.*CRC"):
        _graph_sizes(tf.constant([batch[0], CORPUS["PNG IHDR CRC flipped"]]))


@pytest.mark.parametrize("name, expected", [
    ("8-bit RGB PNG", ("PNG", False, 3)), ("8-bit grey PNG", ("PNG", True, 1)),
    ("16-bit grey+alpha PNG", ("PNG", True, 2)), ("16-bit RGBA PNG", ("PNG", False, 4)),
    ("palette PNG with tRNS", ("PNG", False, 3)), ("grey JPEG", ("JPEG", True, 1)),
    ("progressive JPEG", ("JPEG", False, 3))])
def test_read_header_names_format_colour_and_stored_channels(name, expected):
    header = headers.read_header(CORPUS[name])
    assert (header.format, header.grey, header.channels) == expected


def test_read_header_refusals_name_the_problem():
    with pytest.raises(headers.ImageReadError, match=r"'a\.png': corrupt PNG.*CRC"):
        headers.read_header(CORPUS["PNG IHDR CRC flipped"], "a.png")
    with pytest.raises(headers.ImageReadError, match=r"over 2\*\*31 - 1"):
        headers.read_header(CORPUS["PNG declaring width 2**31"])
    with pytest.raises(headers.ImageReadError, match="empty image"):
        headers.read_header(CORPUS["PNG width 0"])
    with pytest.raises(headers.ImageReadError, match="4 colour components"):
        headers.read_header(CORPUS["CMYK JPEG"])
    assert headers.read_header(CORPUS["CMYK JPEG"], allow_cmyk=True).channels == 4
    with pytest.raises(headers.UnsupportedFormatError, match="GIF data, not PNG or JPEG"):
        headers.read_header(CORPUS["GIF"])
    # The image reader raises the same classes (one set of reading errors).
    assert image_io.ImageReadError is headers.ImageReadError


# -------------------------------------------------------------------- EXIF orientation
def test_exif_orientation_is_read_from_png_and_jpeg():
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = np.zeros((2, 3, 3), np.uint8)
    assert headers.exif_orientation(_pillow(pixels, "PNG", exif=exif)) == 6
    assert headers.exif_orientation(_pillow(pixels, "JPEG", exif=exif)) == 6
    assert headers.exif_orientation(_pillow(pixels, "JPEG")) == 1
    assert headers.exif_orientation(b"GIF89a") == 1


def test_corrupt_exif_is_ignored(tmp_path):
    values = np.arange(6, dtype=np.uint8).reshape(2, 3)
    for block in (b"", b"II*\x00\xff\xff\xff\x7f", b"MM\x00*\x00\x00\x00\x08\x00\x01",
                  b"II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x09\x00"):
        data = raw_png(values[..., None], 0, 8, extra=chunk(b"eXIf", block))
        assert headers.exif_orientation(data) == 1
        path = tmp_path / "odd.png"
        path.write_bytes(data)
        assert image_io.read_image(str(path)).shape == (2, 3, 1)


# ------------------------------------------- issue 21: quoting, work per byte, truncated scans
def test_escaped_prefix_quotes_at_most_64_bytes_in_ascii():
    quote = tf.function(graph_headers.escaped_prefix)
    assert quote(tf.constant(b"ab\\c\x00\xff\n")).numpy() == b"ab\\x5cc\\x00\\xff\\x0a"
    long = quote(tf.constant(bytes(range(256)) * 4096)).numpy()
    assert long.endswith(b"...") and long.isascii() and long.count(b"\\x") <= 64
    assert quote(tf.constant(b"")).numpy() == b""


def test_check_payloads_bounds_jpeg_pixels_per_byte_of_file():
    bound = graph_headers.MAX_JPEG_PIXELS_PER_SCAN_BYTE
    data = CORPUS["baseline JPEG"]
    png = CORPUS["8-bit RGB PNG"]

    checked = tf.function(graph_headers.check_payloads)

    def check(height, width, is_png=False):
        return checked(tf.constant([png, data]), tf.constant([1, height], tf.int64),
                       tf.constant([1, width], tf.int64), tf.constant([True, is_png]))

    assert check(bound, len(data)).shape == (2,)  # exactly the bound: accepted
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"element\] \[1\] \[is a truncated JPEG.*pixels per byte"):
        check(bound, len(data) + 1)
    assert check(bound, len(data) + 1, is_png=True).shape == (2,)  # PNGs are not bounded here


def _jpeg_variants() -> dict[str, bytes]:
    rng = np.random.default_rng(21)
    photo = rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)
    return {
        "baseline 4:2:0": _pillow(photo, "JPEG", quality=90),
        "baseline 4:4:4": _pillow(photo, "JPEG", quality=95, subsampling=0),
        "progressive": _pillow(photo, "JPEG", progressive=True),
        "progressive optimised": _pillow(photo, "JPEG", progressive=True, optimize=True),
        "grey": _pillow(photo[..., 0], "JPEG"),
        "restart markers": _pillow(photo, "JPEG", restart_marker_rows=1),
        "CMYK": _pillow(photo, "JPEG", mode="CMYK"),
        "TensorFlow's encoder": tf.io.encode_jpeg(photo).numpy(),
        "1x1": _pillow(photo[:1, :1], "JPEG"),
        "flat, optimised": _pillow(np.full((16, 16), 128, np.uint8), "JPEG", optimize=True,
                                   quality=5),
        "trailing bytes after the end marker": _pillow(photo, "JPEG") + b"\x00\x01" * 40,
    }


JPEG_VARIANTS = _jpeg_variants()


@pytest.mark.parametrize("name", sorted(JPEG_VARIANTS))
def test_complete_jpegs_decode_as_libjpeg_decodes_them(name):
    data = JPEG_VARIANTS[name]
    expected = tf.io.decode_jpeg(data, channels=3).numpy() / 255.0
    decoded = graph_headers.decode_image_bytes(tf.constant(data), 3).numpy()
    np.testing.assert_allclose(decoded, expected, atol=1e-7)


def _scan_cut(jpeg: bytes, fraction: float) -> bytes:
    start = jpeg.rindex(b"\xff\xda")
    start += 2 + struct.unpack(">H", jpeg[start + 2:start + 4])[0]
    data = jpeg[:start + int((jpeg.rindex(b"\xff\xd9") - start) * fraction)]
    return data.rstrip(b"\xff") + b"\xff\xd9"


@pytest.mark.parametrize("name", ["baseline 4:2:0", "baseline 4:4:4", "progressive", "grey",
                                  "restart markers", "CMYK"])
@pytest.mark.parametrize("fraction", [0.0, 0.4, 0.9])
def test_a_jpeg_whose_last_scan_is_cut_is_refused(name, fraction):
    cut = _scan_cut(JPEG_VARIANTS[name], fraction)
    tf.io.decode_jpeg(cut)  # libjpeg alone accepts it, filling the missing blocks
    for channels in (1, 3):
        with pytest.raises(tf.errors.InvalidArgumentError, match="truncated JPEG"):
            graph_headers.decode_image_bytes(tf.constant(cut), channels)
