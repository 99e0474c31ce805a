"""Image files in and out: PNG/JPEG to float32 arrays in [0, 1], float arrays to rounded PNGs.

Shared by the purify command, the serving client and the evaluation code so that every path
reads and writes pixels the same way. Reading treats every file as possibly hostile:

* **Formats**: only PNG and JPEG are read, recognised by their signature bytes whatever the
  file is called (the authors' "clean" ImageNet images are JPEG data named ``.png``). Anything
  else (EPS, GIF, TIFF, BMP, WebP, ... even when named ``x.png``) is refused before any decoder
  sees it, so no other decoder (Ghostscript for EPS) is ever run. Pillow is not used to decode.
* **Size before work**: a file larger than ``max_bytes`` is refused from its ``fstat`` size
  before it is read; the declared width and height (the PNG ``IHDR``; for JPEG libjpeg's own
  header reader, ``tf.image.extract_jpeg_shape``) are checked against ``max_pixels`` before
  anything is decoded, so a 69-byte PNG declaring 20000x20000 pixels costs 69 bytes.
  Non-regular files (FIFOs, devices) are refused without blocking.
* **Decoding** is TensorFlow's (``tf.io.decode_png``/``decode_jpeg``), the same decoders as the
  serving signatures, so the command and serving read identical values:

  - 8-bit (and 1/2/4-bit, expanded to 8) PNG and JPEG: ``value / 255``;
  - 16-bit PNG (grey, grey+alpha, RGB, RGBA): full precision, ``value / 65535``
    (Pillow 13 truncates 16-bit RGB and grey+alpha PNGs to 8 bits, which is why it is not used);
  - palettes are expanded to RGB; grey is repeated to 3 channels for a 3-channel reader; colour
    becomes grey for a 1-channel reader with the decoder's luma (about ITU-R 601-2:
    0.299 R + 0.587 G + 0.114 B);
  - **alpha is dropped**, not composited: colour values are used as stored, whatever their
    transparency (a palette's ``tRNS`` included).

  JPEGs with other than 1 or 3 colour components (CMYK) are refused.
* **EXIF orientation** (tag 0x0112 in a JPEG's APP1 segment or a PNG's ``eXIf`` chunk) is
  applied after decoding, as ``PIL.ImageOps.exif_transpose`` would, so phone photos come out
  upright. A corrupt EXIF block is ignored (orientation 1); the serving signatures receive bytes
  from clients and do not apply it.

Writing rounds ``y * 255`` to the nearest integer (the authors' release truncated; see
``comdefend_tf.weights.importer.truncate_to_uint8`` to reproduce that) and replaces the file
atomically through a fresh temporary file, so an interrupted run never leaves half a PNG and a
planted symbolic link is replaced, never written through.

Listing (``list_images``) streams folders and globs with a cap on the number of files, never
follows symbolic links to folders during ``**`` recursion (so link loops cannot recurse), and
refuses, by name and with a reason, files that are symbolic links leading outside the input
tree, dangling links and non-regular files.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import os
import stat
import struct

import numpy as np

from comdefend_tf.io.atomic import atomic_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
FORMATS = ("PNG", "JPEG")

# Defaults of the reading limits (the purify command's --max_image_pixels, --max_file_bytes,
# --max_files). 100 M pixels holds the largest camera frames (about 102 MP) and reads into
# 1.2 GB of float32 RGB; TensorFlow's PNG decoder refuses more than 2**29 pixels whatever
# the setting. 512 MiB holds a 100 MP 16-bit RGB PNG.
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_BYTES = 512 * 2**20
DEFAULT_MAX_FILES = 1_000_000

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
# Signatures of formats we refuse, only to name them in the refusal.
_OTHER_SIGNATURES = (
    (b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS (DOS binary)"), (b"GIF8", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"), (b"RIFF", "RIFF (WebP/AVI)"),
    (b"%PDF", "PDF"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "Photoshop"), (b"P1", "PNM"), (b"P2", "PNM"),
    (b"P3", "PNM"), (b"P4", "PNM"), (b"P5", "PNM"), (b"P6", "PNM"), (b"<", "XML/SVG/HTML"),
)
_PNG_GREY_TYPES = (0, 4)          # grey, grey + alpha
_PNG_COLOUR_TYPES = (2, 3, 6)     # RGB, palette, RGBA
_PNG_BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


class ImageReadError(ValueError):
    """A file that is not a readable image; the message names the file and the reason."""


class ImageTooLargeError(ImageReadError):
    """A file larger than the byte cap, or an image declaring more pixels than the limit."""


class UnsupportedFormatError(ImageReadError):
    """A file that is not PNG or JPEG data, whatever its name."""


class TooManyFilesError(ValueError):
    """An input pattern that matches more files than the cap allows."""


@dataclasses.dataclass(frozen=True)
class ImageHeader:
    """What a file declares before decoding: ``format`` (PNG or JPEG), ``height``, ``width``
    and ``grey`` (True when the stored colour is grey, with or without alpha)."""

    format: str
    height: int
    width: int
    grey: bool


def read_image(path: str, channels: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Reads a PNG or JPEG file as float32 in [0, 1], upright per its EXIF orientation.

    Args:
      path: the image file.
      channels: 3 (RGB; grey images are repeated), 1 (grey), or None to keep grey images grey
        and give everything else RGB. Alpha is dropped, palettes are expanded (module docstring).
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
    """The bytes of a regular file of at most ``max_bytes`` bytes.

    The size is taken from ``fstat`` of the opened file before reading, and reading stops one
    byte past the cap in case the file grows meanwhile. The file is opened non-blocking so a
    FIFO named like an image cannot hang the reader.

    Raises:
      FileNotFoundError: no such file.
      ImageTooLargeError: more than ``max_bytes`` bytes.
      ImageReadError: not a regular file, or not readable (permissions, I/O error).
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"no image file at {path!r}") from None
    except OSError as error:
        raise ImageReadError(f"cannot open {path!r}: {error.strerror or error}") from error
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise ImageReadError(f"{path!r} is not a regular file")
        if info.st_size > max_bytes:
            raise ImageTooLargeError(f"{path!r} is {info.st_size:,} bytes, more than the limit of "
                                     f"{max_bytes:,} bytes")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(descriptor, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise ImageTooLargeError(f"{path!r} grew past the limit of {max_bytes:,} bytes "
                                     f"while it was read")
        return b"".join(chunks)
    except OSError as error:
        raise ImageReadError(f"cannot read {path!r}: {error.strerror or error}") from error
    finally:
        os.close(descriptor)


def read_header(data: bytes, name: str = "<bytes>") -> ImageHeader:
    """Format, declared size and colour kind of PNG or JPEG bytes, without decoding pixels.

    Raises:
      UnsupportedFormatError: neither PNG nor JPEG (the message names what it looks like).
      ImageReadError: a PNG or JPEG whose header is corrupt or declares something unreadable.
    """
    if data.startswith(_PNG_SIGNATURE):
        return _png_header(data, name)
    if data.startswith(_JPEG_SIGNATURE):
        return _jpeg_header(data, name)
    kind = next((label for signature, label in _OTHER_SIGNATURES if data.startswith(signature)),
                None)
    what = f"{kind} data" if kind else f"data starting {data[:8]!r}"
    raise UnsupportedFormatError(f"{name!r} is {what}, not PNG or JPEG (the only formats read)")


def _png_header(data: bytes, name: str) -> ImageHeader:
    # IHDR must be the first chunk: length 13, then width, height, bit depth, colour type.
    if len(data) < 33 or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        raise ImageReadError(f"{name!r}: corrupt PNG (no IHDR chunk first)")
    width, height, bit_depth, colour_type = struct.unpack(">IIBB", data[16:26])
    if colour_type not in _PNG_BIT_DEPTHS or bit_depth not in _PNG_BIT_DEPTHS[colour_type]:
        raise ImageReadError(f"{name!r}: corrupt PNG (bit depth {bit_depth} with colour type "
                             f"{colour_type})")
    _check_dimensions(height, width, name)
    return ImageHeader("PNG", height, width, colour_type in _PNG_GREY_TYPES)


def _jpeg_header(data: bytes, name: str) -> ImageHeader:
    import tensorflow as tf

    # libjpeg's own header reader: the size the decoder will allocate, nothing decoded.
    try:
        height, width, components = (int(v) for v in tf.image.extract_jpeg_shape(data).numpy())
    except tf.errors.OpError as error:
        raise ImageReadError(f"{name!r}: corrupt JPEG header ({_tf_message(error)})") from None
    if components not in (1, 3):
        raise ImageReadError(f"{name!r}: JPEG with {components} colour components (CMYK or "
                             f"unusual); only grey (1) and colour (3) JPEGs are read")
    _check_dimensions(height, width, name)
    return ImageHeader("JPEG", height, width, components == 1)


def _check_dimensions(height: int, width: int, name: str) -> None:
    if height < 1 or width < 1:
        raise ImageReadError(f"{name!r} declares an empty image ({width}x{height} pixels)")


def decode_image(data: bytes, channels: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 name: str = "<bytes>") -> np.ndarray:
    """Decodes PNG or JPEG bytes as ``read_image`` does (same rules, same errors), with the
    pixel limit checked on the declared size before decoding."""
    import tensorflow as tf

    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    header = read_header(data, name)
    if header.height * header.width > max_pixels:
        raise ImageTooLargeError(
            f"{name!r} declares {header.width}x{header.height} = "
            f"{header.width * header.height:,} pixels, more than the limit of {max_pixels:,}")
    out_channels = channels or (1 if header.grey else 3)
    try:
        if header.format == "PNG":
            decoded, scale = tf.io.decode_png(data, channels=out_channels, dtype=tf.uint16), 65535
        else:
            decoded, scale = tf.io.decode_jpeg(data, channels=out_channels), 255
        pixels = decoded.numpy()
    except tf.errors.OpError as error:
        raise ImageReadError(f"{name!r}: corrupt or truncated {header.format} "
                             f"({_tf_message(error)})") from None
    del decoded
    if pixels.shape != (header.height, header.width, out_channels):
        raise ImageReadError(f"{name!r}: decoded shape {pixels.shape} differs from the declared "
                             f"{header.height}x{header.width}")
    image = pixels.astype(np.float32)
    del pixels
    image /= np.float32(scale)
    return apply_orientation(image, exif_orientation(data))


def _tf_message(error) -> str:
    # TF prefixes op errors with "{{function_node ...}}"; keep the decoder's own words.
    message = getattr(error, "message", str(error))
    return message.split("}}")[-1].strip()


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1..8) of PNG or JPEG bytes; 1 when absent, corrupt or unknown.

    Looks in a JPEG's APP1 ``Exif`` segments before the first scan, or in a PNG's ``eXIf`` chunk
    (anywhere before ``IEND``), and reads tag 0x0112 of the first image file directory.
    """
    tiff = None
    if data.startswith(_PNG_SIGNATURE):
        tiff = _png_chunk(data, b"eXIf")
    elif data.startswith(_JPEG_SIGNATURE):
        tiff = _jpeg_exif(data)
    if tiff is None:
        return 1
    return _tiff_orientation(tiff)


def _png_chunk(data: bytes, wanted: bytes) -> bytes | None:
    position = len(_PNG_SIGNATURE)
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


def write_png(path: str, image) -> None:
    """Writes an image as PNG, replacing ``path`` atomically.

    The pixels go to a new temporary file in the same folder (created exclusively, so a planted
    file or link of that name is never written through) which then replaces ``path``; if
    ``path`` is a symbolic link, the link is replaced, not its target.

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
    with atomic_path(path) as partial, open(partial, "wb") as handle:
        pil_image.save(handle, format="PNG")


@dataclasses.dataclass
class ImageListing:
    """The files an input pattern names: ``paths`` to read, sorted, and ``refused`` (path,
    reason) pairs for files that must not be read (links leading outside the input tree,
    dangling links, non-regular files)."""

    paths: list[str]
    refused: list[tuple[str, str]]


def list_images(pattern: str, max_files: int = DEFAULT_MAX_FILES) -> ImageListing:
    """The image files named by ``pattern``.

    Args:
      pattern: one file (any extension: its content decides; followed if it is a link), a
        folder (its ``.png``, ``.jpg`` and ``.jpeg`` files, any case, not recursive) or a glob
        (``photos/*.jpg``; ``**`` recurses without following links to folders).
      max_files: refuse patterns matching more files than this (counted as they stream in from
        ``os.scandir``, so a huge folder is never listed whole first).

    Symbolic links among the matches are read only when they lead to a regular file inside the
    input tree (the folder, or the glob's leading folder); others are refused with a reason.

    Raises:
      FileNotFoundError: nothing matches (the message repeats the pattern).
      TooManyFilesError: more than ``max_files`` matches.
    """
    if os.path.isfile(pattern):
        return ImageListing([pattern], [])
    if os.path.isdir(pattern):
        root, candidates = pattern, _folder_images(pattern)
        empty = f"folder {pattern!r} holds no {'/'.join(IMAGE_EXTENSIONS)} files"
    else:
        root, candidates = _glob_root(pattern)[0] or ".", _walk_glob(pattern)
        empty = (f"no file matches {pattern!r} (expected an image file, a folder or a glob "
                 f"such as 'photos/*.png')")
    root_real = os.path.realpath(root)
    paths, refused = [], []
    for path in candidates:
        reason = _refusal(path, root_real)
        if reason == "folder":
            continue
        if reason:
            refused.append((path, reason))
        else:
            paths.append(path)
        if len(paths) + len(refused) > max_files:
            raise TooManyFilesError(f"{pattern!r} matches more than {max_files:,} files; split "
                                    f"the input or raise the limit (--max_files)")
    if not paths and not refused:
        raise FileNotFoundError(empty)
    return ImageListing(sorted(paths), sorted(refused))


def _folder_images(folder: str):
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.lower().endswith(IMAGE_EXTENSIONS):
                yield entry.path


def _glob_root(pattern: str) -> tuple[str, list[str]]:
    """(the glob's leading folder without wildcards, as written or '' for none; the remaining
    path segments)."""
    parts = pattern.split(os.sep)
    fixed = 0
    while fixed < len(parts) - 1 and not glob.has_magic(parts[fixed]):
        fixed += 1
    root = os.sep.join(parts[:fixed]) or (os.sep if fixed else "")
    return root, [part for part in parts[fixed:] if part]


def _walk_glob(pattern: str):
    """Files matching a glob, as ``glob`` matches them (hidden names only by an explicit
    leading dot), streamed one folder entry at a time. A ``**`` never follows links to folders,
    so link loops end; other wildcard segments do (their depth is bounded by the pattern)."""
    root, segments = _glob_root(pattern)
    seen = set()
    for path in _match_segments(root, segments):
        if path not in seen:  # 'a/**/**/b' reaches a file along several routes
            seen.add(path)
            yield path


def _match_segments(folder: str, segments: list[str]):
    if not segments:
        return
    head, rest = segments[0], segments[1:]
    try:
        listing = os.scandir(folder or ".")
    except OSError:
        return
    subfolders = []
    with listing:
        for entry in listing:
            hidden = entry.name.startswith(".")
            path = os.path.join(folder, entry.name)
            try:
                if head == "**":
                    if not hidden and entry.is_dir(follow_symlinks=False):
                        subfolders.append(path)
                    if not hidden and not rest:  # a final '**' matches everything below
                        yield path
                elif (not hidden or head.startswith(".")) and fnmatch.fnmatchcase(entry.name,
                                                                                    head):
                    if not rest:
                        yield path
                    elif entry.is_dir():
                        subfolders.append(path)
            except OSError:
                continue
    if head == "**":
        if rest:
            yield from _match_segments(folder, rest)
        for subfolder in subfolders:
            yield from _match_segments(subfolder, segments)
    else:
        for subfolder in subfolders:
            yield from _match_segments(subfolder, rest)


def _refusal(path: str, root_real: str) -> str | None:
    """Why ``path`` must not be read (None: read it; "folder": silently not a file)."""
    try:
        target = os.path.realpath(path)
        if os.path.islink(path) and not os.path.exists(target):
            return "dangling symbolic link"
        if os.path.commonpath([target, root_real]) != root_real:
            return (f"leads outside the input folder {root_real!r} through a symbolic link "
                    f"(to {target!r})")
        info = os.stat(path)
    except (OSError, ValueError) as error:
        return f"cannot inspect: {error}"
    if stat.S_ISDIR(info.st_mode):
        return "folder"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    return None


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
