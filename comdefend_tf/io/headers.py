"""What PNG/JPEG bytes declare, read in Python without decoding pixels; the reading errors.

``read_header(data, name)`` -> ``ImageHeader(format "PNG"|"JPEG", height, width, grey,
channels)``; ``exif_orientation(data)`` -> 1..8 (1 when absent or corrupt). Refusals raise
``UnsupportedFormatError`` (neither PNG nor JPEG, what it looks like named) or
``ImageReadError`` (a PNG whose IHDR is missing, cut, fails its CRC, has a bad depth/colour
type or a side of 0 or over 2**31 - 1; a JPEG libjpeg cannot parse or, unless asked, one with
other than 1 or 3 components). The in-graph twin is ``comdefend_tf.io.graph_headers``; tests
run both on one corpus.
"""

from __future__ import annotations

import dataclasses
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
