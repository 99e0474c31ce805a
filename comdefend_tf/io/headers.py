"""What PNG/JPEG bytes declare, read in Python without decoding pixels; the reading errors.

``read_header(data, name)`` -> ``ImageHeader(format "PNG"|"JPEG", height, width, grey,
channels)``; ``exif_orientation(data)`` -> 1..8 (1 when absent or corrupt). Refusals raise
``UnsupportedFormatError`` (neither PNG nor JPEG, what it looks like named) or
``ImageReadError`` (a PNG whose IHDR is missing, cut, fails its CRC, has a bad depth/colour
type or a side of 0 or over 2**31 - 1; a JPEG libjpeg cannot parse or, unless asked, one with
other than 1 or 3 components). The in-graph twin is ``comdefend_tf.io.graph_headers``; tests
run both on one corpus.

``check_payload(data, header, name)`` bounds decoding work per byte of input before any decoder
runs (``ImageReadError``, "corrupt or truncated"): a PNG needs at least one IDAT byte per
``PNG_MAX_INFLATE_RATIO`` (1,032, deflate's own maximum) bytes of pixel data it declares; a
JPEG must end its scans with the end-of-image marker, have at most ``MAX_JPEG_SCANS`` (100)
scans, give each scan the restart markers its restart interval needs and (Huffman coding) the
bits its blocks need at least, and code at most ``MAX_JPEG_PIXELS_PER_SCAN_BYTE`` (1,024)
declared pixels per byte of scan data. Not detectable without the decoder's warnings: a scan
without restart markers cut part-way and closed by a marker, long enough for its blocks
(libjpeg decodes the rest as grey).
"""

from __future__ import annotations

import dataclasses
import math
import re
import struct
import zlib

FORMATS = ("PNG", "JPEG")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
# Signatures of formats we refuse, only to name them in the refusal.
_OTHER_SIGNATURES = (
    (b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS (DOS binary)"), (b"GIF8", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"), (b"RIFF", "RIFF (WebP/AVI)"),
    (b"%PDF", "PDF"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "Photoshop"), (b"P1", "PNM"), (b"P2", "PNM"),
    (b"P3", "PNM"), (b"P4", "PNM"), (b"P5", "PNM"), (b"P6", "PNM"), (b"<", "XML/SVG/HTML"),
)
_PNG_IHDR_LENGTH_AND_TYPE = b"\x00\x00\x00\x0dIHDR"
_PNG_MAX_SIDE = 2 ** 31 - 1  # the PNG specification's limit for width and height
_PNG_GREY_TYPES = (0, 4)          # grey, grey + alpha
_PNG_BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
# Channels as stored: grey, RGB, palette (expanded to RGB), grey + alpha, RGBA.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
# Samples per pixel in the compressed data (a palette index is one sample).
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}

# Decoding work per byte of input (``check_payload``; docs/internals/io.md has the measurements).
# Deflate codes at most 258 bytes in 2 bits, so no PNG inflates more than 1,032 times its IDAT
# bytes (a flat 1-bit 4000x3000 PNG from zlib -9 reaches 7,812 pixels per file byte; the rule
# accepts every valid PNG).
PNG_MAX_INFLATE_RATIO = 1032
# Flat JPEGs reach 256 declared pixels per byte of scan data (Pillow and TF encoders, baseline
# and progressive, optimised, grey); Huffman coding cannot pass 512 (one bit per 8x8 block in a
# progressive DC scan). Twice that is the bound: above it a file is a decompression bomb.
MAX_JPEG_PIXELS_PER_SCAN_BYTE = 1024
# libjpeg's progressive scripts use up to 10 scans; each scan is one more pass over every block.
MAX_JPEG_SCANS = 100
MAX_JPEG_SEGMENTS = 10_000
MAX_PNG_CHUNKS = 1_000_000
# Where a JPEG scan's entropy-coded data ends: a marker other than stuffing (FF00), restarts
# (FFD0-FFD7) and fill bytes (FF FF). One character class, so the search runs at ~2 GB/s.
_JPEG_SCAN_END = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
_JPEG_FILL = re.compile(rb"\xff+")
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])
_JPEG_FRAMES = frozenset([0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                          0xCF])


class ImageReadError(ValueError):
    """A file that is not a readable image; the message names the file and the reason."""


class ImageTooLargeError(ImageReadError):
    """A file larger than the byte cap, or an image declaring more pixels than the limit."""


class UnsupportedFormatError(ImageReadError):
    """A file that is not PNG or JPEG data, whatever its name."""


@dataclasses.dataclass(frozen=True)
class ImageHeader:
    """What a file declares before decoding: ``format`` (PNG or JPEG), ``height``, ``width``,
    ``grey`` (True when the stored colour is grey, with or without alpha) and ``channels`` as
    stored (PNG: 1 grey, 2 grey + alpha, 3 RGB or palette, 4 RGBA; JPEG: its components)."""

    format: str
    height: int
    width: int
    grey: bool
    channels: int


def read_header(data: bytes, name: str = "<bytes>", allow_cmyk: bool = False) -> ImageHeader:
    """Format, declared size and colour kind of PNG or JPEG bytes, without decoding pixels.

    ``allow_cmyk``: accept JPEGs with 4 components (``channels`` 4), which the image reader
    refuses but ``tf.io.decode_image`` converts to RGB.

    Raises:
      UnsupportedFormatError: neither PNG nor JPEG (the message names what it looks like).
      ImageReadError: a PNG or JPEG whose header is corrupt or declares something unreadable.
    """
    if data.startswith(PNG_SIGNATURE):
        return _png_header(data, name)
    if data.startswith(JPEG_SIGNATURE):
        return _jpeg_header(data, name, allow_cmyk)
    kind = next((label for signature, label in _OTHER_SIGNATURES if data.startswith(signature)),
                None)
    what = f"{kind} data" if kind else f"data starting {data[:8]!r}"
    raise UnsupportedFormatError(f"{name!r} is {what}, not PNG or JPEG (the only formats read)")


def _png_header(data: bytes, name: str) -> ImageHeader:
    # IHDR must be the first chunk: length 13, then width, height, bit depth, colour type,
    # compression, filter, interlace, and the chunk's CRC (of type and data).
    if len(data) < 33 or data[8:16] != _PNG_IHDR_LENGTH_AND_TYPE:
        raise ImageReadError(f"{name!r}: corrupt PNG (no IHDR chunk first)")
    (crc,) = struct.unpack(">I", data[29:33])
    if zlib.crc32(data[12:29]) & 0xFFFFFFFF != crc:
        raise ImageReadError(f"{name!r}: corrupt PNG (the IHDR chunk's CRC does not match)")
    width, height, bit_depth, colour_type = struct.unpack(">IIBB", data[16:26])
    if colour_type not in _PNG_BIT_DEPTHS or bit_depth not in _PNG_BIT_DEPTHS[colour_type]:
        raise ImageReadError(f"{name!r}: corrupt PNG (bit depth {bit_depth} with colour type "
                             f"{colour_type})")
    if width > _PNG_MAX_SIDE or height > _PNG_MAX_SIDE:
        raise ImageReadError(f"{name!r}: corrupt PNG (declares {width}x{height} pixels, a side "
                             f"over 2**31 - 1)")
    check_dimensions(height, width, name)
    return ImageHeader("PNG", height, width, colour_type in _PNG_GREY_TYPES,
                       _PNG_CHANNELS[colour_type])


def _jpeg_header(data: bytes, name: str, allow_cmyk: bool) -> ImageHeader:
    import tensorflow as tf

    # libjpeg's own header reader: the size the decoder will allocate, nothing decoded.
    try:
        height, width, components = (int(v) for v in tf.image.extract_jpeg_shape(data).numpy())
    except tf.errors.OpError as error:
        raise ImageReadError(f"{name!r}: corrupt JPEG header ({tf_message(error)})") from None
    if components not in ((1, 3, 4) if allow_cmyk else (1, 3)):
        raise ImageReadError(f"{name!r}: JPEG with {components} colour components (CMYK or "
                             f"unusual); only grey (1) and colour (3) JPEGs are read")
    check_dimensions(height, width, name)
    return ImageHeader("JPEG", height, width, components == 1, components)


def check_payload(data: bytes, header: ImageHeader, name: str = "<bytes>") -> None:
    """Refuses ``data`` too short for the image ``header`` declares, before decoding.

    Work is bounded per byte of input: the checks walk chunk and segment headers (capped at
    ``MAX_PNG_CHUNKS`` / ``MAX_JPEG_SEGMENTS``) and search scans for their end in C, never
    decoding pixels. See the module docstring for the rules.

    Raises:
      ImageReadError: "corrupt or truncated PNG/JPEG" with what is missing.
    """
    if header.format == "PNG":
        _check_png_payload(data, header, name)
    else:
        _check_jpeg_payload(data, header, name)


def _check_png_payload(data: bytes, header: ImageHeader, name: str) -> None:
    bit_depth, colour_type = data[24], data[25]
    pixel_bytes = math.ceil(header.height * header.width * bit_depth * _PNG_SAMPLES[colour_type]
                            / 8)
    needed = math.ceil(pixel_bytes / PNG_MAX_INFLATE_RATIO)
    position, image_data, chunks = len(PNG_SIGNATURE), 0, 0
    while image_data < needed:
        if position + 8 > len(data):
            break
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise ImageReadError(f"{name!r}: corrupt PNG (more than {MAX_PNG_CHUNKS:,} chunks "
                                 f"before its image data is complete)")
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        if kind == b"IEND":
            break
        if kind == b"IDAT":
            image_data += min(length, len(data) - position - 8)
        position += 12 + length
    if image_data < needed:
        raise ImageReadError(
            f"{name!r}: corrupt or truncated PNG ({image_data:,} bytes of image data cannot hold "
            f"the {header.width}x{header.height} pixels it declares: deflate needs at least "
            f"{needed:,}, one per {PNG_MAX_INFLATE_RATIO:,} bytes of pixels)")


def _check_jpeg_payload(data: bytes, header: ImageHeader, name: str) -> None:
    def refuse(what):
        raise ImageReadError(f"{name!r}: corrupt or truncated JPEG ({what})")

    position, segments, scans, scan_bytes, restart_interval = 2, 0, 0, 0, 0
    frame = None  # (coding, {component id: (h, v)}) once the frame header is read
    while True:
        fill = _JPEG_FILL.match(data, position)  # fill bytes (FF FF ...) before a marker
        if fill:
            position = fill.end() - 1
        if position + 2 > len(data):
            refuse("the data ends before the end-of-image marker")
        if data[position] != 0xFF:
            refuse(f"no marker at byte {position:,}")
        marker = data[position + 1]
        if marker == 0xD9:
            break
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            refuse(f"more than {MAX_JPEG_SEGMENTS:,} segments")
        if marker in _JPEG_STANDALONE:
            position += 2
            continue
        if position + 4 > len(data):
            refuse("the data ends inside a segment header")
        (length,) = struct.unpack(">H", data[position + 2:position + 4])
        body = data[position + 4:position + 2 + length]
        if length < 2 or len(body) != length - 2:
            refuse(f"a segment at byte {position:,} runs past the end of the data")
        position += 2 + length
        if marker in _JPEG_FRAMES:
            frame = _jpeg_frame(marker, body)
        elif marker == 0xDD and len(body) >= 2:  # define restart interval (0: none)
            (restart_interval,) = struct.unpack(">H", body[:2])
        if marker != 0xDA:
            continue
        scans += 1
        if scans > MAX_JPEG_SCANS:
            refuse(f"more than {MAX_JPEG_SCANS} scans, each a pass over every block")
        end = _JPEG_SCAN_END.search(data, position)
        if end is None:
            refuse(f"the data ends inside scan {scans}, before the end-of-image marker")
        _jpeg_check_scan(data, position, end.start(), frame, body, header, restart_interval,
                         scans, refuse)
        scan_bytes += end.start() - position
        position = end.start()
    if not scans:
        refuse("no scan before the end-of-image marker")
    pixels = header.height * header.width
    if pixels > MAX_JPEG_PIXELS_PER_SCAN_BYTE * max(scan_bytes, 1):
        refuse(f"{header.width}x{header.height} = {pixels:,} pixels declared for {scan_bytes:,} "
               f"bytes of scan data, more than {MAX_JPEG_PIXELS_PER_SCAN_BYTE:,} pixels per byte")


def _jpeg_frame(marker: int, body: bytes):
    """(coding: ``sequential``/``progressive`` (Huffman), ``arithmetic`` or ``lossless``;
    {component id: (h, v) sampling factors})."""
    coding = {0xC0: "sequential", 0xC1: "sequential", 0xC2: "progressive", 0xC9: "arithmetic",
              0xCA: "arithmetic"}.get(marker, "lossless")
    count = body[5] if len(body) > 5 else 0
    components = {}
    for index in range(count):
        entry = body[6 + 3 * index:9 + 3 * index]
        if len(entry) == 3:
            components[entry[0]] = (max(entry[1] >> 4, 1), max(entry[1] & 15, 1))
    return coding, components


def _jpeg_scan_units(frame, body: bytes, header: ImageHeader):
    """(coding units of a scan: MCUs of an interleaved scan, blocks of a one-component scan;
    8x8 blocks it codes; whether it codes DC), or None when the frame is missing, lossless or
    names components it lacks."""
    if frame is None or frame[0] == "lossless" or not body:
        return None
    components = frame[1]
    count = body[0]
    ids = [body[1 + 2 * index] for index in range(count) if 1 + 2 * index < len(body)]
    if not ids or not components or any(i not in components for i in ids):
        return None
    spectral_start = body[1 + 2 * count] if 1 + 2 * count < len(body) else 0
    h_max = max(h for h, _ in components.values())
    v_max = max(v for _, v in components.values())
    if len(ids) == 1:
        h, v = components[ids[0]]
        units = (math.ceil(math.ceil(header.width * h / h_max) / 8)
                 * math.ceil(math.ceil(header.height * v / v_max) / 8))
        return units, units, spectral_start == 0
    units = math.ceil(header.width / (8 * h_max)) * math.ceil(header.height / (8 * v_max))
    return units, units * sum(components[i][0] * components[i][1] for i in ids), \
        spectral_start == 0


def _jpeg_check_scan(data: bytes, start: int, end: int, frame, body: bytes,
                     header: ImageHeader, restart_interval: int, scan: int, refuse) -> None:
    """Refuses a scan whose coded data (``data[start:end]``) is too short for what it codes:
    fewer restart markers than its restart interval needs, or (Huffman coding) fewer bits than
    its blocks need at least: every block of a sequential scan codes a DC symbol and an
    end-of-block (1 bit each at least), every block of a progressive DC scan at least 1 bit
    (progressive AC scans can cover many blocks with one end-of-band run)."""
    sizes = _jpeg_scan_units(frame, body, header)
    if sizes is None:
        return
    units, blocks, codes_dc = sizes
    if restart_interval:
        expected = math.ceil(units / restart_interval) - 1
        found = sum(data.count(bytes((0xFF, 0xD0 + n)), start, end) for n in range(8))
        if found < expected:
            refuse(f"scan {scan} has {found:,} of its {expected:,} restart markers")
    bits_per_block = {"sequential": 2, "progressive": 1 if codes_dc else 0}.get(frame[0], 0)
    needed_bits = blocks * bits_per_block
    if (end - start) * 8 < needed_bits:
        refuse(f"scan {scan} has {end - start:,} bytes of coded data; its blocks need at least "
               f"{math.ceil(needed_bits / 8):,}")


def check_dimensions(height: int, width: int, name: str) -> None:
    """Refuses a declared size with a side under 1 (``ImageReadError`` naming the file)."""
    if height < 1 or width < 1:
        raise ImageReadError(f"{name!r} declares an empty image ({width}x{height} pixels)")


def tf_message(error) -> str:
    """The decoder's own words of a TensorFlow op error (without the function-node prefix)."""
    message = getattr(error, "message", str(error))
    return message.split("}}")[-1].strip()


# ------------------------------------------------------------------------ EXIF orientation
def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1..8) of PNG or JPEG bytes; 1 when absent, corrupt or unknown.

    Looks in a JPEG's APP1 ``Exif`` segments before the first scan, or in a PNG's ``eXIf`` chunk
    (anywhere before ``IEND``), and reads tag 0x0112 of the first image file directory.
    """
    tiff = None
    if data.startswith(PNG_SIGNATURE):
        tiff = _png_chunk(data, b"eXIf")
    elif data.startswith(JPEG_SIGNATURE):
        tiff = _jpeg_exif(data)
    if tiff is None:
        return 1
    return _tiff_orientation(tiff)


def _png_chunk(data: bytes, wanted: bytes) -> bytes | None:
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        if kind == wanted:
            return data[position + 8:position + 8 + length]
        if kind == b"IEND":
            return None
        position += 12 + length  # length, type, data, CRC; always advances
    return None


def _jpeg_exif(data: bytes) -> bytes | None:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            position += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan, end of image: no EXIF after this
            return None
        (length,) = struct.unpack(">H", data[position + 2:position + 4])
        if length < 2:
            return None
        segment = data[position + 4:position + 2 + length]
        if marker == 0xE1 and segment.startswith(b"Exif\x00\x00"):
            return segment[6:]
        position += 2 + length
    return None


def _tiff_orientation(tiff: bytes) -> int:
    byte_order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if byte_order is None or len(tiff) < 8:
        return 1
    magic, first_ifd = struct.unpack(byte_order + "HI", tiff[2:8])
    if magic != 42 or first_ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(byte_order + "H", tiff[first_ifd:first_ifd + 2])
    for index in range(count):
        entry = first_ifd + 2 + 12 * index
        if entry + 12 > len(tiff):
            return 1
        tag, kind, number = struct.unpack(byte_order + "HHI", tiff[entry:entry + 8])
        if tag == 0x0112:
            if kind != 3 or number < 1:  # SHORT, stored in the entry itself
                return 1
            (value,) = struct.unpack(byte_order + "H", tiff[entry + 8:entry + 10])
            return value if 1 <= value <= 8 else 1
    return 1
