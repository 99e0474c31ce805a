"""In-graph PNG/JPEG header checks and the bounded decoder of encoded images.

``declared_sizes``: string ``[n]`` -> ``(heights int64 [n], widths int64 [n], is_png bool
[n])`` read from the headers alone (PNG signature, IHDR length, type, CRC and sides in
[1, 2**31 - 1]; JPEG by ``tf.image.extract_jpeg_shape``), nothing decoded.
``check_payloads``: refuses, before decoding, a JPEG declaring more than
``MAX_JPEG_PIXELS_PER_SCAN_BYTE`` pixels per byte of its whole file (decode work per input byte).
``decode_image_bytes``: one encoded string -> float32 ``[height, width, channels]`` in [0, 1],
PNG as ``uint16 / 65535`` (8-bit PNGs give exactly ``uint8 / 255``), JPEG as ``uint8 / 255``; a
JPEG whose scan data ends before its last block is refused (``decode_declared``).
Every refusal is an ``InvalidArgumentError`` raised in the graph, naming the first problem;
``escaped_prefix`` is how a message quotes input bytes (at most ``QUOTED_BYTES``, ASCII).
The Python twin of the header checks is ``comdefend_tf.io.headers``; tests run both on one
corpus.
"""

from __future__ import annotations

import tensorflow as tf

# One bound for both readers (its derivation is in io.headers): the Python reader applies it
# per byte of scan data, the graph per byte of the whole file (it does not walk segments).
from comdefend_tf.io.headers import MAX_JPEG_PIXELS_PER_SCAN_BYTE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# Signature (8 bytes), IHDR length (4), type (4), data (13: width, height, depth, colour type,
# compression, filter, interlace), CRC (4): every PNG starts with these 33 bytes.
PNG_HEADER_BYTES = 33
PNG_IHDR_LENGTH_AND_TYPE = b"\x00\x00\x00\x0dIHDR"
PNG_MAX_SIDE = 2 ** 31 - 1  # the PNG specification's limit for width and height
JPEG_EOI = b"\xff\xd9"
# Inserted before a JPEG's last end-of-image marker to probe for a truncated scan: libjpeg skips
# bytes after complete scan data, but decodes them into the blocks a truncated scan lacks. No
# 0xFF byte (a marker); mixed bits, so they decode to other coefficients than libjpeg's zeros.
JPEG_PROBE_BYTES = bytes([0x55, 0xAA, 0x33, 0xCC]) * 16
QUOTED_BYTES = 64  # the most input bytes an error message quotes
# Printable ASCII as itself, every other byte (and the backslash) as \xNN: a message that
# quotes input stays ASCII, whatever the input (Python decodes messages as UTF-8).
_ESCAPES = [chr(byte) if 0x20 <= byte < 0x7F and byte != 0x5C else f"\\x{byte:02x}"
            for byte in range(256)]


def check(condition, *message_and_values):
    """``tf.debugging.Assert`` of ``condition`` with a message of strings and tensors."""
    return tf.debugging.Assert(condition, list(message_and_values), summarize=8)


def refuse_unless(checks, value: tf.Tensor) -> tf.Tensor:
    """``value`` when every check holds; otherwise raises the first failing check's message.

    ``checks``: list of ``(condition, message_and_values)``. The result is the output of a
    ``tf.cond`` on all conditions, a data dependency: nothing that consumes it can run before
    the checks are decided. Later checks are vacuous once an earlier one failed, so the error
    names the first problem (the channel check says nothing about a rank-3 tensor).
    """
    all_ok = tf.reduce_all(tf.stack([condition for condition, _ in checks]))

    def refuse():
        earlier_ok = tf.constant(True)
        asserts = []
        for condition, message in checks:
            asserts.append(check(tf.logical_or(tf.logical_not(earlier_ok), condition),
                                 *message))
            earlier_ok = tf.logical_and(earlier_ok, condition)
        with tf.control_dependencies(asserts):
            return tf.identity(value)

    return tf.cond(all_ok, lambda: tf.identity(value), refuse)


def escaped_prefix(data: tf.Tensor, length: int = QUOTED_BYTES) -> tf.Tensor:
    """String scalar -> its first ``length`` bytes, escaped to ASCII (``_ESCAPES``), then
    ``...`` when it is longer: how an error message quotes input."""
    head = tf.io.decode_raw(tf.strings.substr(data, 0, length), tf.uint8)
    quoted = tf.strings.reduce_join(tf.gather(tf.constant(_ESCAPES), tf.cast(head, tf.int32)))
    return tf.strings.join([quoted, tf.where(tf.strings.length(data) > length, "...", "")])


def _crc32_table() -> list[int]:
    """The 256-entry table of the reflected CRC-32 (polynomial 0xEDB88320) that PNG uses."""
    table = []
    for byte in range(256):
        value = byte
        for _ in range(8):
            value = (value >> 1) ^ 0xEDB88320 if value & 1 else value >> 1
        table.append(value)
    return table


def _crc32(data: tf.Tensor) -> tf.Tensor:
    """CRC-32 of every row of ``data`` (int64 ``[n, length]`` bytes, static length) -> int64
    ``[n]``; unrolled over the few bytes of a PNG IHDR chunk."""
    table = tf.constant(_crc32_table(), tf.int64)
    crc = tf.fill(tf.shape(data)[:1], tf.constant(0xFFFFFFFF, tf.int64))
    for index in range(data.shape[1]):
        low = tf.bitwise.bitwise_and(tf.bitwise.bitwise_xor(crc, data[:, index]), 0xFF)
        crc = tf.bitwise.bitwise_xor(tf.gather(table, low), tf.bitwise.right_shift(crc, 8))
    return tf.bitwise.bitwise_xor(crc, 0xFFFFFFFF)


def _big_endian(data: tf.Tensor) -> tf.Tensor:
    """int64 ``[n, 4]`` bytes -> int64 ``[n]`` unsigned big-endian values."""
    return tf.reduce_sum(data * tf.constant([1 << 24, 1 << 16, 1 << 8, 1], tf.int64), axis=1)


def _first_index(condition: tf.Tensor) -> tf.Tensor:
    """Index of the first True in a bool vector (0 when there is none)."""
    return tf.argmax(tf.cast(condition, tf.int32), output_type=tf.int32)


def declared_sizes(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Reads every image's size from its header, without decoding; refuses bad headers.

    Args:
      encoded: string ``[n]``, ``n >= 1``.

    Returns:
      ``(heights, widths, is_png)``: int64 ``[n]``, int64 ``[n]``, bool ``[n]``. PNG sizes come
      from the IHDR chunk (after checking the signature, the chunk's length, type and CRC,
      and that width and height are in [1, 2**31 - 1]); JPEG sizes from
      ``tf.image.extract_jpeg_shape``, which parses the header without decoding (its own
      ``InvalidArgumentError`` "Invalid JPEG data" for a header it cannot parse, including
      sides over libjpeg's 65500).

    Raises (in the graph): ``InvalidArgumentError`` naming the first problem and the element.
    """
    is_png = tf.equal(tf.strings.substr(encoded, 0, len(PNG_MAGIC)), PNG_MAGIC)
    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, len(JPEG_MAGIC)), JPEG_MAGIC)
    supported = tf.logical_or(is_png, is_jpeg)
    encoded = refuse_unless(
        [(tf.reduce_all(supported),
          ["image_bytes must hold PNG or JPEG encoded images; element",
           _first_index(tf.logical_not(supported)), "is neither (",
           tf.strings.length(encoded), "bytes each; empty, corrupt or another format such as "
           "GIF, BMP, WebP or EPS)"])],
        encoded)

    # The first 33 bytes of every element, zero-padded (substr from 0 is valid on any string).
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(encoded, 0, PNG_HEADER_BYTES),
                                              b"\x00" * PNG_HEADER_BYTES]),
                             0, PNG_HEADER_BYTES)
    head = tf.cast(tf.io.decode_raw(head, tf.uint8, fixed_length=PNG_HEADER_BYTES), tf.int64)
    head = tf.reshape(head, [-1, PNG_HEADER_BYTES])
    long_enough = tf.strings.length(encoded) >= PNG_HEADER_BYTES
    ihdr_start = tf.reduce_all(tf.equal(head[:, 8:16], tf.constant(
        list(PNG_IHDR_LENGTH_AND_TYPE), tf.int64)), axis=1)
    crc_ok = tf.equal(_crc32(head[:, 12:29]), _big_endian(head[:, 29:33]))
    png_width, png_height = _big_endian(head[:, 16:20]), _big_endian(head[:, 20:24])
    sides_ok = tf.logical_and(
        tf.logical_and(png_width >= 1, png_width <= PNG_MAX_SIDE),
        tf.logical_and(png_height >= 1, png_height <= PNG_MAX_SIDE))
    not_png = tf.logical_not(is_png)
    png_checks = [
        (tf.logical_or(not_png, long_enough),
         "is a truncated PNG (shorter than the 33-byte signature and IHDR chunk)"),
        (tf.logical_or(not_png, ihdr_start),
         "is a malformed PNG: its first chunk is not a 13-byte IHDR chunk"),
        (tf.logical_or(not_png, crc_ok), "is a corrupt PNG: the IHDR chunk's CRC does not match"),
        (tf.logical_or(not_png, sides_ok),
         "is a malformed PNG: its IHDR declares a width or height of 0 or over 2**31 - 1"),
    ]
    checks = []
    earlier_ok = tf.ones_like(is_png)
    for condition, text in png_checks:
        # An element fails only its first failing check, so the message names that one.
        failed = tf.logical_and(earlier_ok, tf.logical_not(condition))
        checks.append((tf.logical_not(tf.reduce_any(failed)),
                       ["image_bytes element", _first_index(failed), text]))
        earlier_ok = tf.logical_and(earlier_ok, condition)
    encoded = refuse_unless(checks, encoded)

    def jpeg_size(element):
        data, jpeg = element
        return tf.cond(jpeg, lambda: tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64),
                       lambda: tf.zeros([2], tf.int64))

    jpeg_sizes = tf.map_fn(jpeg_size, (encoded, is_jpeg), parallel_iterations=1,
                           fn_output_signature=tf.TensorSpec([2], tf.int64))
    heights = tf.where(is_png, png_height, jpeg_sizes[:, 0])
    widths = tf.where(is_png, png_width, jpeg_sizes[:, 1])
    return heights, widths, is_png


def check_payloads(encoded: tf.Tensor, heights: tf.Tensor, widths: tf.Tensor,
                   is_png: tf.Tensor) -> tf.Tensor:
    """``encoded`` (string ``[n]``, sizes from ``declared_sizes``) once no JPEG declares more
    than ``MAX_JPEG_PIXELS_PER_SCAN_BYTE`` pixels per byte of its file; run before decoding.

    No complete Huffman-coded JPEG comes near the bound (io.headers), so a file over it is
    truncated or a decompression bomb; libjpeg's work is then bounded per byte of input. A PNG
    needs no such check: inflating is bounded by deflate's ratio, and the decoder stops where
    the compressed data ends.
    """
    sizes = tf.cast(tf.strings.length(encoded), tf.int64)
    # Exact in int64: a JPEG side is at most 65,535, a file under 2**53 bytes.
    sparse = tf.logical_and(tf.logical_not(is_png),
                            heights * widths > MAX_JPEG_PIXELS_PER_SCAN_BYTE * sizes)
    first = _first_index(sparse)
    return refuse_unless(
        [(tf.logical_not(tf.reduce_any(sparse)),
          ["image_bytes element", first, "is a truncated JPEG or a decompression bomb: it "
           "declares height x width", tf.stack([heights[first], widths[first]]), "in only",
           sizes[first], f"bytes, more than {MAX_JPEG_PIXELS_PER_SCAN_BYTE} pixels per byte "
           "(no complete JPEG codes that many)"])], encoded)


def _probe_before_eoi(encoded: tf.Tensor) -> tf.Tensor:
    """``encoded`` with ``JPEG_PROBE_BYTES`` inserted before its last end-of-image marker
    (unchanged when it has none: libjpeg refuses a JPEG that runs out of data)."""
    data = tf.io.decode_raw(encoded, tf.uint8)
    eoi = tf.logical_and(tf.equal(data[:-1], JPEG_EOI[0]), tf.equal(data[1:], JPEG_EOI[1]))
    positions = tf.where(eoi)[:, 0]
    at = tf.cond(tf.size(positions) > 0, lambda: tf.cast(positions[-1], tf.int32),
                 lambda: tf.strings.length(encoded))
    return tf.strings.join([tf.strings.substr(encoded, 0, at), JPEG_PROBE_BYTES,
                            tf.strings.substr(encoded, at, tf.strings.length(encoded) - at)])


def _decode_complete_jpeg(encoded: tf.Tensor, channels: int) -> tf.Tensor:
    """uint8 pixels of a JPEG whose scans are complete; refuses a truncated scan.

    libjpeg (and so ``tf.io.decode_jpeg``) fills the blocks of a scan cut short before an
    end-of-image marker with zeros and only warns. The JPEG is decoded a second time with
    ``JPEG_PROBE_BYTES`` before that marker: after complete scan data they are skipped and the
    pixels are the same; a truncated scan decodes them into its missing blocks, and the pixels
    differ.
    """
    pixels = tf.io.decode_jpeg(encoded, channels=channels)
    probed = tf.io.decode_jpeg(_probe_before_eoi(encoded), channels=channels)
    return refuse_unless(
        [(tf.reduce_all(tf.equal(pixels, probed)),
          ["a truncated JPEG: its scan data ends before its last block (libjpeg would fill "
           "the rest of its height x width x channels", tf.shape(pixels), "with grey)"])],
        pixels)


def decode_declared(encoded: tf.Tensor, is_png: tf.Tensor, height: tf.Tensor, width: tf.Tensor,
                    channels: int) -> tf.Tensor:
    """One PNG or JPEG string whose header was checked -> float32 ``[height, width, channels]``
    in [0, 1]: PNG as ``uint16 / 65535`` (8-bit PNGs give exactly ``uint8 / 255``), JPEG as
    ``uint8 / 255`` (a CMYK JPEG for a 1-channel model through RGB, which libjpeg can convert
    it to). Refuses an image whose decoded size differs from its declared one, and a JPEG whose
    scan data is truncated (``_decode_complete_jpeg``)."""
    def decode_png():
        pixels = tf.io.decode_png(encoded, channels=channels, dtype=tf.uint16)
        return tf.cast(pixels, tf.float32) / 65535.0

    def decode_jpeg():
        if channels != 1:
            return tf.cast(_decode_complete_jpeg(encoded, channels), tf.float32) / 255.0

        def cmyk_to_grey():
            # libjpeg converts CMYK to RGB but not to grey: go through RGB (ITU-R 601 luma).
            rgb = _decode_complete_jpeg(encoded, 3)
            return tf.round(tf.image.rgb_to_grayscale(tf.cast(rgb, tf.float32))) / 255.0

        def grey():
            return tf.cast(_decode_complete_jpeg(encoded, 1), tf.float32) / 255.0

        return tf.cond(tf.equal(tf.image.extract_jpeg_shape(encoded)[2], 4), cmyk_to_grey, grey)

    image = tf.cond(is_png, decode_png, decode_jpeg)
    image = tf.ensure_shape(image, [None, None, channels])
    decoded = tf.cast(tf.shape(image)[:2], tf.int64)
    return refuse_unless(
        [(tf.reduce_all(tf.equal(decoded, tf.stack([height, width]))),
          ["an image decoded to height x width", decoded, "but its header declared",
           tf.stack([height, width])])], image)


def decode_image_bytes(encoded: tf.Tensor, channels: int) -> tf.Tensor:
    """One encoded PNG or JPEG (a string scalar) -> float32 ``[height, width, channels]`` in
    [0, 1], exactly as ``purify_bytes`` reads it: the header checked and its declared size read
    first (``declared_sizes``, ``check_payloads``), then PNG decoded as ``uint16 / 65535`` and
    JPEG as ``uint8 / 255``. No size limit is applied here (``purify_bytes`` applies
    ``max_pixels``)."""
    encoded = tf.reshape(tf.convert_to_tensor(encoded, tf.string), [1])
    heights, widths, is_png = declared_sizes(encoded)
    encoded = check_payloads(encoded, heights, widths, is_png)
    return decode_declared(encoded[0], is_png[0], heights[0], widths[0], channels)
