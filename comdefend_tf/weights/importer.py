"""The authors' released ComDefend weights: a safe reader and the import into ``ComDefend``.

The authors (jiaxiaojunQAQ/Comdefend, TensorFlow 1) released one file per network, e.g.
``enc20_0.0001.npy`` (ComCNN) and ``dec20_0.0001.npy`` (ResCNN). Despite the ``.npy`` name each
is a zip archive in ``np.savez_compressed`` format whose single member ``w.npy`` is an object
array of 18 float32 arrays ``[W1, b1, ..., W9, b9]``: one kernel/bias pair per 3x3 convolution,
first layer first, kernels already in Keras' HWIO layout ``(3, 3, in, out)``.

A weight file is whatever a user hands us, so ``read_weight_arrays`` uses neither
``np.load(..., allow_pickle=True)`` nor ``zipfile`` nor ``pickle``. What it accepts:

* A regular file of at most ``MAX_FILE_BYTES`` that is a zip archive holding exactly one
  member, ``w.npy``, stored or deflated (the two methods numpy writes), not encrypted, not
  ZIP64, not split, declaring at most ``MAX_MEMBER_BYTES``. The archive is parsed here; the
  member is inflated in ``READ_CHUNK_BYTES`` pieces with a bound on each piece's output, so a
  member that inflates beyond what it declared is refused after at most one byte more than it
  declared (never more than ``MAX_MEMBER_BYTES + 1``), and its CRC-32 must match.
* A ``.npy`` (version 1.0 or 2.0) header declaring a 1-D object array of at most
  ``MAX_ARRAYS`` entries, followed by a pickle of exactly that array.
* The pickle is run by a small purpose-built interpreter (``_WeightPickle``) that knows only
  the opcodes numpy writes for such an array (protocols 2 to 4: numpy 1 and 2) and only the
  globals in ``ALLOWED_GLOBALS``, none of which it ever calls with the file's arguments.
  ``_reconstruct`` is accepted only as numpy uses it (``(numpy.ndarray, (0,), b"b")``),
  ``numpy.dtype`` only for ``f2``/``f4``/``f8`` and ``O8``, ``_codecs.encode`` only to turn
  latin-1 text into bytes, ``numpy.ndarray`` only as ``_reconstruct``'s first argument. Every
  array state is checked before numpy builds the array from it: a float array from a float16/32/64
  dtype and exactly ``prod(shape) * itemsize`` raw bytes (at most ``MAX_ARRAY_DIMENSIONS``
  dimensions, none negative), the object array only from a list of such already-built float
  arrays. Nested object arrays, other dtypes, other globals, any call of ``numpy.ndarray``
  (which builds an object array over raw, attacker-chosen pointers and crashes the process),
  a second state for the same array, memo references to nothing, protocol 0/1/5 pickles,
  out-of-band buffers, persistent ids, extension codes and the INST/OBJ/NEWOBJ family are
  refused. The interpreter's work is bounded too: at most ``MAX_PICKLE_OPERATIONS``
  operations, ``MAX_PICKLE_STACK`` stack items and open marks, ``MAX_PICKLE_MEMO`` memo
  entries, and new bytes (encoded text, array data) up to twice the pickle's own size, so
  reusing one large memo entry cannot multiply memory.
* Entries must be finite; they are returned as float32.

Everything else raises ``ReferenceWeightsError`` (a ``ValueError``) naming the file and the
problem; a missing path raises ``FileNotFoundError``. No file, however crafted, ends in a
``zipfile``, ``zlib``, ``pickle`` or ``numpy`` exception. Plain ``.npy`` files are refused: the
release is always the zip form.

``load_reference_model`` infers which released architecture the files hold (``paper`` widths
with RGB or 1-channel input, or the ``released_gray`` widths) from the array shapes and loads
them into a ``ComDefend`` with ``set_weights``, no transposition. Errors name the file and the
layer. The module also holds the two uint8 conversions (the release's truncation and our
rounding) and code-logit statistics (how binary a code is).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle  # opcode constants only: nothing here calls pickle.load
import pickletools
import stat
import struct
import zlib
from typing import Sequence

import numpy as np

from comdefend_tf.config import ComDefendConfig, get_config
from comdefend_tf.io.images import to_uint8 as round_to_uint8  # our rounding, for comparison

WEIGHTS_MEMBER = "w.npy"
CONVOLUTIONS_PER_NETWORK = 9
ARRAYS_PER_NETWORK = 2 * CONVOLUTIONS_PER_NETWORK

# Limits on what a weight file may make us read, allocate or interpret. A released file is
# 3.5 MB, unpacks to 4.9 MB and runs about 850 pickle operations; each limit leaves a wide
# margin above that while bounding the memory and time a crafted file can cost.
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_MEMBER_BYTES = 64 * 1024 * 1024
MAX_ARCHIVE_MEMBERS = 16  # a weight file holds one; up to this many are parsed to be named
MAX_ARRAYS = 64  # entries of the object array (a released file has 18)
MAX_ARRAY_DIMENSIONS = 4
MAX_NPY_HEADER_BYTES = 10_000  # numpy's own default limit
MAX_PICKLE_OPERATIONS = 100_000
MAX_PICKLE_STACK = 1024
MAX_PICKLE_MEMO = 4096
MAX_GLOBAL_NAME_BYTES = 256
READ_CHUNK_BYTES = 64 * 1024

# sha256 of the authors' files at jiaxiaojunQAQ/Comdefend commit 6cd8b4e, used only to record
# provenance (an unknown hash is still loaded if its shapes fit).
RELEASED_FILES_SHA256 = {
    "14ad4726c517982d2c74b809bf1fd623f8abbe887d15e8b24f3a5dee2bb504d5": "enc20_0.0001.npy",
    "d2df77581e5913c126a30c943acb29bbada6beb942a189652c4f726d7a98ecf7": "dec20_0.0001.npy",
    "0a68830c61e364189e8f2c81d742425af34bb7c5119601bab08710454cd4114b": "enc_mnist.npy",
    "54a4eec163bc7d4c7447acb63b9d0a2b0736c2f89c588ebd57e441d93525b651": "dec_mnist.npy",
}
RELEASE_SOURCE = "jiaxiaojunQAQ/Comdefend@6cd8b4e"


class ReferenceWeightsError(ValueError):
    """A weight file that cannot be read, is refused as unsafe, or fits no released
    architecture. The message names the file and the problem."""


# ------------------------------------------------------------------------------ zip container
_EOCD = struct.Struct("<4sHHHHIIH")  # end of central directory record, 22 bytes
_CENTRAL_ENTRY = struct.Struct("<4sHHHHHHIIIHHHHHII")  # central directory file header, 46 bytes
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # local file header, 30 bytes
_EOCD_SIGNATURE = b"PK\x05\x06"
_ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
_CENTRAL_SIGNATURE = b"PK\x01\x02"
_LOCAL_SIGNATURE = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
_STORED, _DEFLATED = 0, 8
_COMPRESSION_NAMES = {0: "stored", 1: "shrink", 6: "implode", 8: "deflate", 9: "deflate64",
                      12: "bzip2", 14: "LZMA", 93: "zstd", 95: "xz", 98: "PPMd",
                      99: "AES encryption"}
_ENCRYPTION_FLAGS = 0x0001 | 0x0040 | 0x2000  # encrypted, strong encryption, masked headers
_UTF8_NAME_FLAG = 0x0800
_ZIP64_MARK_16, _ZIP64_MARK_32 = 0xFFFF, 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class _ZipMember:
    """One central-directory entry, as declared (nothing here is trusted yet)."""

    name: str
    raw_name: bytes
    flags: int
    method: int
    crc32: int
    compressed_size: int
    size: int
    disk: int
    header_offset: int


def _open_weight_file(path: str):
    """Opens ``path`` for reading if it is a regular file within ``MAX_FILE_BYTES``.

    ``O_NONBLOCK`` keeps a FIFO from blocking the open; the type is checked on the open
    descriptor, so a path swapped after a check cannot slip a device or FIFO in.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"no weight file at {path!r}") from None
    except OSError as error:
        raise ReferenceWeightsError(f"{path}: cannot open: {error.strerror or error}") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise ReferenceWeightsError(
                f"{path}: not a regular file (a directory, device, FIFO or socket); a weight "
                f"file is an npz (zip) archive")
        if info.st_size > MAX_FILE_BYTES:
            raise ReferenceWeightsError(
                f"{path}: {info.st_size} bytes, more than the {MAX_FILE_BYTES} a weight file may "
                f"have (a released file is about 3.5 MB)")
        return os.fdopen(descriptor, "rb"), info.st_size
    except BaseException:
        os.close(descriptor)
        raise


def _read_at(handle, offset: int, length: int, what: str, source: str) -> bytes:
    """Exactly ``length`` bytes at ``offset`` (callers bound ``length`` by the file size)."""
    handle.seek(offset)
    data = handle.read(length)
    if len(data) != length:
        raise ReferenceWeightsError(
            f"{source}: truncated or corrupt zip archive: {what} runs past the end of the file")
    return data


def _zip_members(handle, file_size: int, source: str) -> tuple[list[_ZipMember], int]:
    """Parses the end record and the central directory.

    Returns the members and the central directory's offset (where member data must end).
    """
    head = _read_at(handle, 0, min(file_size, len(_NPY_MAGIC)), "the file's start", source)
    if head == _NPY_MAGIC:
        raise ReferenceWeightsError(
            f"{source}: a plain .npy file, not an npz (zip) archive; the authors' weight files "
            f"are np.savez_compressed archives named .npy with one member {WEIGHTS_MEMBER!r}")
    not_a_zip = (f"{source}: not an npz (zip) archive; the authors' weight files are "
                 f"np.savez_compressed archives named .npy with one member {WEIGHTS_MEMBER!r}")
    if file_size < _EOCD.size:
        raise ReferenceWeightsError(f"{not_a_zip} (the file has only {file_size} bytes)")
    tail_length = min(file_size, _EOCD.size + 0xFFFF)  # the record plus the longest comment
    tail_start = file_size - tail_length
    tail = _read_at(handle, tail_start, tail_length, "the end record", source)
    end = len(tail)
    record = None
    while True:
        position = tail.rfind(_EOCD_SIGNATURE, 0, end)
        if position < 0:
            break
        if position + _EOCD.size <= len(tail):
            fields = _EOCD.unpack_from(tail, position)
            if position + _EOCD.size + fields[7] == len(tail):  # its comment ends the file
                record = position, fields
                break
        end = position
    if record is None:
        if _EOCD_SIGNATURE in tail:
            raise ReferenceWeightsError(
                f"{source}: truncated or corrupt zip archive: its end record does not match the "
                f"file's length")
        if head.startswith(_LOCAL_SIGNATURE[:len(head)]) and len(head) >= 4:
            raise ReferenceWeightsError(
                f"{source}: truncated or corrupt zip archive: it starts like one but has no "
                f"end-of-central-directory record (a file cut short?)")
        raise ReferenceWeightsError(f"{not_a_zip} (no end-of-central-directory record)")
    position, (_, disk, directory_disk, disk_entries, entries, directory_size,
               directory_offset, _) = record
    end_offset = tail_start + position
    if (entries == _ZIP64_MARK_16 or directory_size == _ZIP64_MARK_32
            or directory_offset == _ZIP64_MARK_32
            or (position >= 20 and tail[position - 20:position - 16] == _ZIP64_LOCATOR_SIGNATURE)):
        raise ReferenceWeightsError(
            f"{source}: a ZIP64 archive; a weight file is a few MB and never needs ZIP64")
    if disk != 0 or directory_disk != 0 or disk_entries != entries:
        raise ReferenceWeightsError(f"{source}: a split (multi-disk) zip archive is not a "
                                    f"weight file")
    if entries == 0:
        raise ReferenceWeightsError(f"{source}: the archive has no 'w' entry (members: []); "
                                    f"the authors' weight files hold the arrays in "
                                    f"{WEIGHTS_MEMBER!r}")
    if entries > MAX_ARCHIVE_MEMBERS:
        raise ReferenceWeightsError(
            f"{source}: the archive declares {entries} members; a weight file holds exactly "
            f"one, {WEIGHTS_MEMBER!r}")
    if directory_offset + directory_size != end_offset:
        raise ReferenceWeightsError(
            f"{source}: corrupt zip archive: the central directory ({directory_size} bytes at "
            f"offset {directory_offset}) does not end where the end record starts "
            f"({end_offset})")
    directory = _read_at(handle, directory_offset, directory_size, "the central directory",
                         source)
    members, cursor = [], 0
    for index in range(entries):
        if cursor + _CENTRAL_ENTRY.size > len(directory):
            raise ReferenceWeightsError(
                f"{source}: corrupt zip archive: central directory entry {index} is cut short")
        (signature, _, _, flags, method, _, _, crc32, compressed_size, size, name_length,
         extra_length, comment_length, disk_start, _, _, header_offset) = \
            _CENTRAL_ENTRY.unpack_from(directory, cursor)
        if signature != _CENTRAL_SIGNATURE:
            raise ReferenceWeightsError(
                f"{source}: corrupt zip archive: central directory entry {index} has no "
                f"signature")
        name_start = cursor + _CENTRAL_ENTRY.size
        cursor = name_start + name_length + extra_length + comment_length
        if cursor > len(directory):
            raise ReferenceWeightsError(
                f"{source}: corrupt zip archive: central directory entry {index} runs past the "
                f"directory")
        raw_name = directory[name_start:name_start + name_length]
        name = raw_name.decode("utf-8" if flags & _UTF8_NAME_FLAG else "cp437",
                               errors="replace")
        members.append(_ZipMember(name, raw_name, flags, method, crc32, compressed_size, size,
                                  disk_start, header_offset))
    if cursor != len(directory):
        raise ReferenceWeightsError(
            f"{source}: corrupt zip archive: {len(directory) - cursor} stray bytes after the "
            f"{entries} central directory entries")
    return members, directory_offset


def _member_names(members: Sequence[_ZipMember]) -> str:
    return "[" + ", ".join(repr(m.name[:60]) for m in members) + "]"


def _select_weights_member(members: Sequence[_ZipMember], source: str) -> _ZipMember:
    """The one ``w.npy`` member, checked for what a weight file may declare."""
    matching = [m for m in members if m.raw_name == WEIGHTS_MEMBER.encode()]
    if not matching:
        raise ReferenceWeightsError(
            f"{source}: the archive has no 'w' entry (members: {_member_names(members)}); the "
            f"authors' weight files hold the arrays in {WEIGHTS_MEMBER!r}")
    if len(members) != 1:
        raise ReferenceWeightsError(
            f"{source}: the archive holds {len(members)} members {_member_names(members)}; a "
            f"weight file holds exactly one, {WEIGHTS_MEMBER!r}")
    member = matching[0]
    if member.flags & _ENCRYPTION_FLAGS:
        raise ReferenceWeightsError(f"{source}: {WEIGHTS_MEMBER} is encrypted; weight files "
                                    f"are not")
    if member.method not in (_STORED, _DEFLATED):
        method = _COMPRESSION_NAMES.get(member.method, "unknown")
        raise ReferenceWeightsError(
            f"{source}: {WEIGHTS_MEMBER} uses compression method {member.method} ({method}); a "
            f"weight file is stored or deflated, the two methods numpy writes")
    if _ZIP64_MARK_32 in (member.size, member.compressed_size, member.header_offset):
        raise ReferenceWeightsError(
            f"{source}: {WEIGHTS_MEMBER} declares ZIP64 sizes; a weight file never needs them")
    if member.disk != 0:
        raise ReferenceWeightsError(f"{source}: {WEIGHTS_MEMBER} starts on disk {member.disk}; "
                                    f"a split (multi-disk) zip archive is not a weight file")
    if member.size > MAX_MEMBER_BYTES:
        raise ReferenceWeightsError(
            f"{source}: {WEIGHTS_MEMBER} would unpack to {member.size} bytes, more than the "
            f"{MAX_MEMBER_BYTES} a weight file may hold")
    if member.method == _STORED and member.compressed_size != member.size:
        raise ReferenceWeightsError(
            f"{source}: corrupt zip archive: stored member {WEIGHTS_MEMBER} declares "
            f"{member.compressed_size} bytes stored but {member.size} unpacked")
    return member


def _read_member(handle, member: _ZipMember, data_limit: int, source: str) -> bytes:
    """The member's bytes, inflated in bounded pieces and checked against size and CRC-32.

    ``data_limit`` is where member data must end (the central directory's offset). No piece
    produced can take the output past ``member.size + 1`` bytes, so a member that inflates
    beyond its declaration is refused as soon as it does, whatever its compression ratio.
    """
    where = f"{source}: {WEIGHTS_MEMBER}"
    if member.header_offset + _LOCAL_HEADER.size > data_limit:
        raise ReferenceWeightsError(f"{where}: corrupt zip archive: the local header offset "
                                    f"{member.header_offset} lies outside the member data")
    (signature, _, flags, method, _, _, _, _, _, name_length, extra_length) = \
        _LOCAL_HEADER.unpack(_read_at(handle, member.header_offset, _LOCAL_HEADER.size,
                                      "the local header", source))
    if signature != _LOCAL_SIGNATURE:
        raise ReferenceWeightsError(f"{where}: corrupt zip archive: no local header at offset "
                                    f"{member.header_offset}")
    data_start = member.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    if data_start > data_limit:
        raise ReferenceWeightsError(f"{where}: corrupt zip archive: the local header runs into "
                                    f"the central directory")
    local_name = _read_at(handle, member.header_offset + _LOCAL_HEADER.size, name_length,
                          "the local name", source)
    if (local_name != member.raw_name or method != member.method
            or (flags & _ENCRYPTION_FLAGS) != (member.flags & _ENCRYPTION_FLAGS)):
        raise ReferenceWeightsError(
            f"{where}: corrupt zip archive: the local header (name {local_name[:60]!r}, method "
            f"{method}, flags {flags:#x}) disagrees with the central directory")
    if data_start + member.compressed_size > data_limit:
        raise ReferenceWeightsError(
            f"{where}: truncated or corrupt zip archive: {member.compressed_size} compressed "
            f"bytes from offset {data_start} run past the member data (which ends at "
            f"{data_limit})")

    handle.seek(data_start)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS) if member.method == _DEFLATED else None
    output = bytearray()
    checksum = 0
    left_to_read = member.compressed_size

    def take(piece: bytes) -> None:
        nonlocal checksum
        if len(output) + len(piece) > member.size:
            raise ReferenceWeightsError(
                f"{where}: unpacks to more than the {member.size} bytes it declares (refused "
                f"after {len(output) + len(piece)} bytes; a zip bomb or a corrupt archive)")
        output.extend(piece)
        checksum = zlib.crc32(piece, checksum)

    while left_to_read:
        chunk = handle.read(min(READ_CHUNK_BYTES, left_to_read))
        if not chunk:
            raise ReferenceWeightsError(f"{where}: truncated zip archive: the compressed data "
                                        f"ends early")
        left_to_read -= len(chunk)
        if inflater is None:
            take(chunk)
            continue
        pending = chunk
        while pending:
            if inflater.eof:
                raise ReferenceWeightsError(f"{where}: corrupt zip archive: data follows the "
                                            f"end of the deflate stream")
            try:
                # Bounded pieces, never more than one byte beyond the declaration: enough to
                # see that it is exceeded, without holding a large piece beside the output.
                piece = inflater.decompress(
                    pending, min(member.size - len(output) + 1, READ_CHUNK_BYTES))
            except zlib.error as error:
                raise ReferenceWeightsError(f"{where}: corrupt deflate data ({error})") from None
            take(piece)
            if not piece and len(inflater.unconsumed_tail) == len(pending):
                raise ReferenceWeightsError(f"{where}: corrupt deflate data (no progress)")
            pending = inflater.unconsumed_tail
        if inflater.eof and (inflater.unused_data or left_to_read):
            raise ReferenceWeightsError(f"{where}: corrupt zip archive: data follows the end of "
                                        f"the deflate stream")
    if inflater is not None and not inflater.eof:
        raise ReferenceWeightsError(f"{where}: truncated or corrupt deflate data: the stream "
                                    f"does not end")
    if len(output) != member.size:
        raise ReferenceWeightsError(f"{where}: unpacks to {len(output)} bytes, but declares "
                                    f"{member.size}")
    if checksum != member.crc32:
        raise ReferenceWeightsError(f"{where}: CRC-32 mismatch (file says {member.crc32:08x}, "
                                    f"data gives {checksum:08x}): a corrupt archive")
    return bytes(output)


def _read_weights_member(path: str) -> bytes:
    """The uncompressed bytes of ``w.npy`` in the weight file at ``path`` (see the module
    docstring for what is accepted)."""
    handle, file_size = _open_weight_file(path)
    with handle:
        try:
            members, directory_offset = _zip_members(handle, file_size, path)
            member = _select_weights_member(members, path)
            return _read_member(handle, member, directory_offset, path)
        except OSError as error:  # an I/O error while reading a file that opened
            raise ReferenceWeightsError(f"{path}: cannot read: {error}") from None


# ------------------------------------------------------------------ the .npy member and its pickle
class _AllowedGlobal:
    """A global a weight file may name. It is a token, never the callable itself."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


_RECONSTRUCT = _AllowedGlobal("numpy.core.multiarray._reconstruct")
_NDARRAY = _AllowedGlobal("numpy.ndarray")
_DTYPE = _AllowedGlobal("numpy.dtype")
_ENCODE = _AllowedGlobal("_codecs.encode")
_GLOBALS = {
    # Pickles written by numpy 1 name numpy.core; numpy 2 moved it to numpy._core.
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    # Protocol 2 stores raw bytes as latin-1 text re-encoded by _codecs.encode.
    ("_codecs", "encode"): _ENCODE,
}
ALLOWED_GLOBALS = tuple(sorted(_GLOBALS))
_FLOAT_CODES = ("f2", "f4", "f8")
_OBJECT_CODE = "O8"
_OBJECT_DTYPE_FLAGS = 63  # what numpy pickles for dtype('O'): refcounted, list-pickled, ...


class _PendingDType:
    """``numpy.dtype(code)`` as the pickle asked for it; ``dtype`` is set by its state."""

    __slots__ = ("code", "dtype")

    def __init__(self, code: str):
        self.code = code
        self.dtype = None


class _PendingArray:
    """``_reconstruct(ndarray, (0,), b"b")``; ``array`` is set once its state is checked."""

    __slots__ = ("array",)

    def __init__(self):
        self.array = None


def _describe(value, depth: int = 0) -> str:
    """A short, safe description of an interpreter value for error messages."""
    if isinstance(value, _AllowedGlobal):
        return value.name
    if isinstance(value, _PendingDType):
        return f"dtype {value.code!r}"
    if isinstance(value, _PendingArray):
        if value.array is None:
            return "an array without its state"
        return f"a {value.array.dtype} array of shape {value.array.shape}"
    if isinstance(value, (bytes, str)) and len(value) > 40:
        return f"{type(value).__name__} of length {len(value)}"
    if isinstance(value, tuple):
        if depth >= 2:
            return "(...)"
        inner = ", ".join(_describe(item, depth + 1) for item in value[:8])
        return f"({inner}{', ...' if len(value) > 8 else ''}{',' if len(value) == 1 else ''})"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value) -> bool:
    return type(value) is int  # not bool, not a subclass


def _opcode_name(code: int) -> str:
    info = pickletools.code2op.get(chr(code))
    return info.name if info is not None else f"byte 0x{code:02x} (not a pickle opcode)"


class _WeightPickle:
    """Interprets the pickle of one weight file's object array, and nothing else.

    A stack machine over the opcodes numpy writes for an object array of float arrays
    (protocols 2 to 4). Values are Python constants, tuples, lists and three kinds of tokens
    (allowed globals, pending dtypes, pending arrays); no global is ever called. ``run``
    returns the object array's entries or raises ``ReferenceWeightsError``.
    """

    def __init__(self, data: bytes, start: int, where: str):
        self._data = data
        self._position = start
        self._where = where
        self._opcode_at = start
        self._stack: list = []
        self._marks: list[int] = []
        self._memo: dict[int, object] = {}
        # Bytes the interpreter may create beyond what it reads: encoded text and array data.
        # A released file needs about one payload's worth; reusing one large memo entry many
        # times must not multiply it.
        self._allowance = 2 * len(data) + READ_CHUNK_BYTES

    # -------------------------------------------------------------------------- plumbing
    def _fail(self, message: str):
        raise ReferenceWeightsError(f"{self._where}: pickle byte {self._opcode_at}: {message}")

    def _take(self, count: int) -> bytes:
        if count > len(self._data) - self._position:
            self._fail(f"truncated: needs {count} bytes, {len(self._data) - self._position} "
                       f"are left")
        chunk = self._data[self._position:self._position + count]
        self._position += count
        return chunk

    def _unpack(self, layout: str) -> int:
        return struct.unpack(layout, self._take(struct.calcsize(layout)))[0]

    def _line(self) -> str:
        end = self._data.find(b"\n", self._position, self._position + MAX_GLOBAL_NAME_BYTES)
        if end < 0:
            self._fail(f"a GLOBAL name without a newline in its first {MAX_GLOBAL_NAME_BYTES} "
                       f"bytes")
        raw = self._take(end - self._position + 1)[:-1]
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            self._fail(f"a GLOBAL name that is not ASCII: {raw[:60]!r}")

    def _push(self, value) -> None:
        if len(self._stack) >= MAX_PICKLE_STACK:
            self._fail(f"the stack grows past {MAX_PICKLE_STACK} items")
        self._stack.append(value)

    def _floor(self) -> int:
        return self._marks[-1] if self._marks else 0

    def _pop(self):
        if len(self._stack) <= self._floor():
            self._fail("stack underflow")
        return self._stack.pop()

    def _top(self):
        if len(self._stack) <= self._floor():
            self._fail("stack underflow")
        return self._stack[-1]

    def _pop_to_mark(self) -> list:
        if not self._marks:
            self._fail("no MARK to pop to")
        mark = self._marks.pop()
        items = self._stack[mark:]
        del self._stack[mark:]
        return items

    def _spend(self, count: int, what: str) -> None:
        if count > self._allowance:
            self._fail(f"{what} would take the bytes this pickle creates past twice its own "
                       f"size ({2 * len(self._data)}): a memory bomb")
        self._allowance -= count

    def _put(self, index: int) -> None:
        if index not in self._memo and len(self._memo) >= MAX_PICKLE_MEMO:
            self._fail(f"more than {MAX_PICKLE_MEMO} memo entries")
        self._memo[index] = self._top()

    def _get(self, index: int) -> None:
        if index not in self._memo:
            self._fail(f"refers to memo entry {index}, which was never stored")
        self._push(self._memo[index])

    def _resolve(self, module, name) -> None:
        if not isinstance(module, str) or not isinstance(name, str):
            self._fail(f"STACK_GLOBAL of {_describe(module)}, {_describe(name)}: names must be "
                       f"strings")
        token = _GLOBALS.get((module, name))
        if token is None:
            allowed = ", ".join(".".join(pair) for pair in ALLOWED_GLOBALS)
            self._fail(f"refusing to unpickle the global {module[:80]}.{name[:80]}; a weight "
                       f"file may only reference {allowed}. The file is not a released "
                       f"ComDefend weight file (it may try to run code).")
        self._push(token)

    # ---------------------------------------------------------------- calls and states
    def _call(self, function, arguments):
        """REDUCE: the only calls numpy's pickles of float arrays make, recognised, not run."""
        if not isinstance(arguments, tuple):
            self._fail(f"REDUCE with arguments {_describe(arguments)}, not a tuple")
        if function is _RECONSTRUCT:
            shape = arguments[1] if len(arguments) == 3 else None
            if not (len(arguments) == 3 and arguments[0] is _NDARRAY
                    and type(shape) is tuple and len(shape) == 1 and _is_int(shape[0])
                    and shape[0] == 0 and type(arguments[2]) is bytes
                    and arguments[2] == b"b"):
                self._fail(f"unexpected array reconstruction {_describe(arguments)}; numpy "
                           f"reconstructs arrays only as (numpy.ndarray, (0,), b'b')")
            return _PendingArray()
        if function is _DTYPE:
            if not arguments or not isinstance(arguments[0], str) or (
                    arguments[0] not in _FLOAT_CODES and arguments[0] != _OBJECT_CODE):
                code = _describe(arguments[0]) if arguments else "()"
                self._fail(f"dtype {code} is not allowed: a weight file holds float16/32/64 "
                           f"arrays ('f2', 'f4', 'f8') in one object array ('O8')")
            if not (len(arguments) == 3 and type(arguments[1]) in (int, bool)
                    and arguments[1] == 0 and type(arguments[2]) in (int, bool)
                    and arguments[2] == 1):
                self._fail(f"numpy.dtype called with {_describe(arguments)}; numpy pickles "
                           f"dtypes as (code, False, True)")
            return _PendingDType(arguments[0])
        if function is _ENCODE:
            if not (len(arguments) == 2 and type(arguments[0]) is str
                    and arguments[1] in ("latin1", "latin-1")):
                self._fail(f"_codecs.encode called with {_describe(arguments)}; a weight file "
                           f"uses it only as encode(text, 'latin1')")
            self._spend(len(arguments[0]), "_codecs.encode")
            try:
                return arguments[0].encode("latin-1")
            except UnicodeEncodeError:
                self._fail("_codecs.encode of text with characters beyond latin-1")
        if function is _NDARRAY:
            self._fail("refusing to call numpy.ndarray with the file's arguments: that can "
                       "build an array over raw memory (attacker-chosen pointers); numpy's own "
                       "pickles never call it")
        self._fail(f"REDUCE of {_describe(function)}, which a weight file may not call")

    def _build(self, target, state) -> None:
        """BUILD: sets a dtype's or an array's state once, after checking all of it."""
        if isinstance(target, _PendingDType):
            self._build_dtype(target, state)
        elif isinstance(target, _PendingArray):
            self._build_array(target, state)
        else:
            self._fail(f"BUILD on {_describe(target)}: only arrays and dtypes take a state in a "
                       f"weight file")

    def _build_dtype(self, target: _PendingDType, state) -> None:
        if target.dtype is not None:
            self._fail(f"a second state for dtype {target.code!r}")
        is_object = target.code == _OBJECT_CODE
        byte_orders = ("|",) if is_object else ("<", ">")
        flags = _OBJECT_DTYPE_FLAGS if is_object else 0
        if not (type(state) is tuple and len(state) == 8 and _is_int(state[0]) and state[0] == 3
                and state[1] in byte_orders and state[2:5] == (None, None, None)
                and _is_int(state[5]) and state[5] == -1 and _is_int(state[6])
                and state[6] == -1 and _is_int(state[7]) and state[7] == flags):
            self._fail(f"dtype {target.code!r} with state {_describe(state)}; numpy pickles it "
                       f"as (3, {byte_orders[0]!r}, None, None, None, -1, -1, {flags})")
        target.dtype = np.dtype(object) if is_object else np.dtype(state[1] + target.code)

    def _build_array(self, target: _PendingArray, state) -> None:
        if target.array is not None:
            self._fail("a second state for an array that already has one (it would replace "
                       "checked contents)")
        if not (type(state) is tuple and len(state) == 5 and _is_int(state[0])
                and state[0] == 1):
            self._fail(f"array state {_describe(state)}; numpy pickles it as (1, shape, dtype, "
                       f"fortran_order, data)")
        _, shape, dtype, fortran_order, data = state
        if not (isinstance(dtype, _PendingDType) and dtype.dtype is not None):
            self._fail(f"array state with dtype {_describe(dtype)}, not a numpy dtype with its "
                       f"state")
        if type(fortran_order) is not bool:
            self._fail(f"array state with fortran_order {_describe(fortran_order)}, not a bool")
        if (type(shape) is not tuple or len(shape) > MAX_ARRAY_DIMENSIONS
                or not all(_is_int(size) for size in shape)):
            self._fail(f"array shape {_describe(shape)}: a weight array has at most "
                       f"{MAX_ARRAY_DIMENSIONS} integer dimensions")
        if any(size < 0 for size in shape):
            self._fail(f"array shape {shape} has a negative dimension")
        count = 1
        for size in shape:
            count *= size
        if dtype.dtype == np.dtype(object):
            if len(shape) != 1 or fortran_order or type(data) is not list or len(data) != count:
                self._fail(f"object array of shape {shape} with data {_describe(data)}; it must "
                           f"be 1-D, hold a list of exactly its length, in C order")
            entries = np.empty(count, dtype=object)
            for index, entry in enumerate(data):
                self._check_entry(entry, index)
                entries[index] = entry.array
            target.array = entries
            return
        if type(data) is not bytes:
            self._fail(f"{dtype.dtype} array data is {_describe(data)}, not raw bytes")
        needed = count * dtype.dtype.itemsize
        if len(data) != needed:
            self._fail(f"a {dtype.dtype} array of shape {shape} needs {needed} bytes; the file "
                       f"holds {len(data)}")
        self._spend(needed, f"a {dtype.dtype} array of shape {shape}")
        # numpy's own reconstruction, with a state that is now known to be a float dtype and
        # exactly the bytes its shape needs.
        array = _numpy_reconstruct(np.ndarray, (0,), b"b")
        array.__setstate__((1, shape, dtype.dtype, fortran_order, data))
        target.array = array

    def _check_entry(self, entry, index: int) -> None:
        if not isinstance(entry, _PendingArray):
            self._fail(f"entry {index} is {_describe(entry)}, not a float array")
        if entry.array is None:
            self._fail(f"entry {index} is an array used before its state is set")
        if entry.array.dtype == np.dtype(object):
            self._fail(f"entry {index} is a nested object array; entries must be float arrays")

    def _append(self, target, items: list) -> None:
        if type(target) is not list:
            self._fail(f"APPEND to {_describe(target)}, not a list")
        for item in items:
            if len(target) >= MAX_ARRAYS:
                self._fail(f"a list of more than {MAX_ARRAYS} entries")
            self._check_entry(item, len(target))
            target.append(item)

    # ---------------------------------------------------------------------------- the loop
    def run(self) -> np.ndarray:
        """Interprets to STOP; returns the object array (entries are float arrays)."""
        self._opcode_at = self._position
        if self._take(1) != pickle.PROTO:
            self._fail("the pickle does not start with a protocol marker; numpy writes object "
                       "arrays with protocol 2 to 4")
        protocol = self._unpack("<B")
        if protocol not in (2, 3, 4):
            self._fail(f"pickle protocol {protocol}; numpy writes object arrays with protocol "
                       f"2 to 4")
        for _ in range(MAX_PICKLE_OPERATIONS):
            self._opcode_at = self._position
            code = self._take(1)[0]
            if code == pickle.STOP[0]:
                return self._stop()
            handler = _HANDLERS.get(code)
            if handler is None:
                self._fail(f"opcode {_opcode_name(code)} is not allowed in a weight file (it "
                           f"uses only the opcodes numpy writes for an object array of float "
                           f"arrays)")
            handler(self)
        self._fail(f"more than {MAX_PICKLE_OPERATIONS} pickle operations")

    def _stop(self) -> np.ndarray:
        result = self._pop()
        if self._stack or self._marks:
            self._fail("STOP with more than the result on the stack")
        if self._position != len(self._data):
            self._fail(f"{len(self._data) - self._position} bytes after the pickle's end")
        if not isinstance(result, _PendingArray) or result.array is None:
            self._fail(f"the pickle holds {_describe(result)}, not an object array")
        if result.array.dtype != np.dtype(object):
            self._fail(f"the pickle holds a {result.array.dtype} array, not an object array")
        return result.array

    # Opcode handlers, bound in _HANDLERS below.
    def _op_frame(self):
        if self._unpack("<Q") > len(self._data) - self._position:
            self._fail("a FRAME longer than the rest of the pickle")

    def _op_global(self):
        module = self._line()
        self._resolve(module, self._line())

    def _op_stack_global(self):
        name = self._pop()
        self._resolve(self._pop(), name)

    def _op_reduce(self):
        arguments = self._pop()
        self._push(self._call(self._pop(), arguments))

    def _op_build(self):
        state = self._pop()
        self._build(self._top(), state)

    def _op_mark(self):
        if len(self._marks) >= MAX_PICKLE_STACK:
            self._fail(f"more than {MAX_PICKLE_STACK} open MARKs")
        self._marks.append(len(self._stack))

    def _op_tuple_n(self, count: int):
        items = [self._pop() for _ in range(count)]
        self._push(tuple(reversed(items)))

    def _op_unicode(self, length_layout: str):
        raw = self._take(self._unpack(length_layout))
        try:
            self._push(raw.decode("utf-8", "surrogatepass"))
        except UnicodeDecodeError:
            self._fail("text that is not UTF-8")

    def _op_bytes(self, length_layout: str):
        self._push(self._take(self._unpack(length_layout)))

    def _op_appends(self):
        items = self._pop_to_mark()
        self._append(self._top(), items)

    def _op_append(self):
        item = self._pop()
        self._append(self._top(), [item])


def _numpy_reconstruct(*arguments):
    try:  # numpy 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return _reconstruct(*arguments)


_HANDLERS = {
    pickle.FRAME[0]: _WeightPickle._op_frame,
    pickle.MARK[0]: _WeightPickle._op_mark,
    pickle.GLOBAL[0]: _WeightPickle._op_global,
    pickle.STACK_GLOBAL[0]: _WeightPickle._op_stack_global,
    pickle.REDUCE[0]: _WeightPickle._op_reduce,
    pickle.BUILD[0]: _WeightPickle._op_build,
    pickle.NONE[0]: lambda self: self._push(None),
    pickle.NEWTRUE[0]: lambda self: self._push(True),
    pickle.NEWFALSE[0]: lambda self: self._push(False),
    pickle.BININT[0]: lambda self: self._push(self._unpack("<i")),
    pickle.BININT1[0]: lambda self: self._push(self._unpack("<B")),
    pickle.BININT2[0]: lambda self: self._push(self._unpack("<H")),
    pickle.BINUNICODE[0]: lambda self: self._op_unicode("<I"),
    pickle.SHORT_BINUNICODE[0]: lambda self: self._op_unicode("<B"),
    pickle.BINBYTES[0]: lambda self: self._op_bytes("<I"),
    pickle.SHORT_BINBYTES[0]: lambda self: self._op_bytes("<B"),
    pickle.TUPLE[0]: lambda self: self._push(tuple(self._pop_to_mark())),
    pickle.TUPLE1[0]: lambda self: self._op_tuple_n(1),
    pickle.TUPLE2[0]: lambda self: self._op_tuple_n(2),
    pickle.TUPLE3[0]: lambda self: self._op_tuple_n(3),
    pickle.EMPTY_TUPLE[0]: lambda self: self._push(()),
    pickle.EMPTY_LIST[0]: lambda self: self._push([]),
    pickle.APPEND[0]: _WeightPickle._op_append,
    pickle.APPENDS[0]: _WeightPickle._op_appends,
    pickle.BINPUT[0]: lambda self: self._put(self._unpack("<B")),
    pickle.LONG_BINPUT[0]: lambda self: self._put(self._unpack("<I")),
    pickle.MEMOIZE[0]: lambda self: self._put(len(self._memo)),
    pickle.BINGET[0]: lambda self: self._get(self._unpack("<B")),
    pickle.LONG_BINGET[0]: lambda self: self._get(self._unpack("<I")),
}


def _object_array_entries(payload: bytes, source: str) -> list[np.ndarray]:
    """Parses the ``w.npy`` bytes: a 1-D object-array header, then its pickle."""
    where = f"{source}: {WEIGHTS_MEMBER}"
    stream = io.BytesIO(payload)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(
                stream, max_header_size=MAX_NPY_HEADER_BYTES)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(
                stream, max_header_size=MAX_NPY_HEADER_BYTES)
        else:
            raise ValueError(f"unsupported .npy version {version[0]}.{version[1]} (a weight "
                             f"file is version 1.0 or 2.0)")
    except Exception as error:  # numpy raises several types for a malformed header
        raise ReferenceWeightsError(f"{where}: not a valid .npy member: "
                                    f"{type(error).__name__}: {str(error)[:200]}") from None
    if dtype != np.dtype(object):
        raise ReferenceWeightsError(
            f"{where}: expected an object array of {ARRAYS_PER_NETWORK} arrays, found a plain "
            f"{dtype} array of shape {shape}")
    if len(shape) != 1 or not 1 <= shape[0] <= MAX_ARRAYS or fortran_order:
        raise ReferenceWeightsError(
            f"{where}: the header declares an object array of shape {shape}"
            f"{' in Fortran order' if fortran_order else ''}; a weight file holds a 1-D object "
            f"array of 1 to {MAX_ARRAYS} arrays")
    entries = _WeightPickle(payload, stream.tell(), where).run()
    if entries.shape != tuple(shape):
        raise ReferenceWeightsError(f"{where}: the header says shape {shape}, the pickle holds "
                                    f"{entries.shape}")
    return list(entries)


def read_weight_arrays(path: str) -> list[np.ndarray]:
    """Reads one released weight file without running any code it might contain.

    Args:
      path: a ``.npy``-named ``np.savez_compressed`` (or ``np.savez``) zip archive whose one
        member ``w.npy`` is an object array of float16/32/64 arrays (the release's format).
        The module docstring lists every limit and what is refused.

    Returns:
      the arrays in file order (kernels and biases alternating), each float32 and finite.

    Raises:
      FileNotFoundError: no file at ``path``.
      ReferenceWeightsError: anything else: not a regular file, too large, not a zip archive
        (a plain .npy included), not exactly one ``w`` member, encrypted, compressed other than
        stored/deflate, corrupt, truncated, inflating beyond its declared size, a pickle
        opcode, global, call, dtype or shape a released file does not hold, or non-finite
        values. The message names the file and the problem.
    """
    payload = _read_weights_member(path)
    arrays = []
    for index, entry in enumerate(_object_array_entries(payload, path)):
        entry = entry.astype(np.float32, copy=False)
        if not np.all(np.isfinite(entry)):
            raise ReferenceWeightsError(f"{path}: entry {index} holds non-finite values")
        arrays.append(entry)
    return arrays


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------- architecture inference
@dataclasses.dataclass(frozen=True)
class KnownArchitecture:
    """One released architecture: a label and the config whose layer shapes it has."""

    label: str
    config: ComDefendConfig


def known_architectures() -> tuple[KnownArchitecture, ...]:
    """The architectures a released file may hold, most specific first."""
    return (
        KnownArchitecture("paper widths, RGB (enc20_0.0001/dec20_0.0001)", get_config("paper")),
        KnownArchitecture("released_gray widths, 1 channel (enc_mnist/dec_mnist)",
                          get_config("released_gray")),
        KnownArchitecture("paper widths, 1 channel", get_config("paper", input_channels=1)),
    )


def _stack_shapes(in_channels: int, widths: Sequence[int], out_channels: int):
    shapes, channels = [], in_channels
    for width in tuple(widths) + (out_channels,):
        shapes += [(3, 3, channels, width), (width,)]
        channels = width
    return shapes


def network_shapes(config: ComDefendConfig, network: str) -> list[tuple[int, ...]]:
    """Kernel/bias shapes, in file order, of ``network`` (``encoder`` or ``decoder``)."""
    if network == "encoder":
        return _stack_shapes(config.input_channels, config.encoder_widths, config.code_channels)
    if network == "decoder":
        return _stack_shapes(config.code_channels, config.decoder_widths, config.input_channels)
    raise ValueError(f"network must be 'encoder' or 'decoder', got {network!r}")


def _layer_name(network: str, index: int) -> str:
    prefix = "comcnn" if network == "encoder" else "rescnn"
    return f"{prefix}_conv{index // 2 + 1} {'kernel' if index % 2 == 0 else 'bias'}"


def _first_mismatch(shapes, expected) -> int | None:
    for index, (have, want) in enumerate(zip(shapes, expected)):
        if tuple(have) != tuple(want):
            return index
    return None


def _matches(shapes, config, network) -> bool:
    expected = network_shapes(config, network)
    return len(shapes) == len(expected) and _first_mismatch(shapes, expected) is None


def infer_architecture(encoder_arrays: Sequence[np.ndarray], decoder_arrays: Sequence[np.ndarray],
                       encoder_source: str = "encoder file",
                       decoder_source: str = "decoder file") -> KnownArchitecture:
    """The released architecture both files fit.

    Args:
      encoder_arrays, decoder_arrays: arrays as returned by ``read_weight_arrays``.
      encoder_source, decoder_source: names used in error messages (the file paths).

    Raises:
      ReferenceWeightsError: a wrong number of arrays, encoder and decoder swapped, the two
        files from different architectures, or a shape that fits no known architecture (naming
        the file, the layer, the shape found and the shape expected).
    """
    for arrays, source in ((encoder_arrays, encoder_source), (decoder_arrays, decoder_source)):
        if len(arrays) != ARRAYS_PER_NETWORK:
            raise ReferenceWeightsError(
                f"{source}: holds {len(arrays)} arrays, expected {ARRAYS_PER_NETWORK} (a kernel "
                f"and a bias for each of the {CONVOLUTIONS_PER_NETWORK} convolutions)")
    encoder_shapes = [a.shape for a in encoder_arrays]
    decoder_shapes = [a.shape for a in decoder_arrays]
    known = known_architectures()

    encoder_fits = [arch for arch in known if _matches(encoder_shapes, arch.config, "encoder")]
    decoder_fits = [arch for arch in known if _matches(decoder_shapes, arch.config, "decoder")]
    for arch in encoder_fits:
        if arch in decoder_fits:
            return arch

    swapped_encoder = [a for a in known if _matches(decoder_shapes, a.config, "encoder")]
    swapped_decoder = [a for a in known if _matches(encoder_shapes, a.config, "decoder")]
    if swapped_encoder and swapped_decoder:
        raise ReferenceWeightsError(
            f"encoder and decoder swapped: {encoder_source} holds a ResCNN (decoder) and "
            f"{decoder_source} holds a ComCNN (encoder); pass them the other way round")
    if swapped_decoder and not encoder_fits:
        raise ReferenceWeightsError(
            f"{encoder_source}: holds a ResCNN (decoder, {swapped_decoder[0].label}), not a "
            f"ComCNN (encoder); was the decoder file given twice or the files swapped?")
    if swapped_encoder and not decoder_fits:
        raise ReferenceWeightsError(
            f"{decoder_source}: holds a ComCNN (encoder, {swapped_encoder[0].label}), not a "
            f"ResCNN (decoder); was the encoder file given twice or the files swapped?")
    if encoder_fits and decoder_fits:
        raise ReferenceWeightsError(
            f"{encoder_source} ({encoder_fits[0].label}) and {decoder_source} "
            f"({decoder_fits[0].label}) come from different architectures")

    # Report the first layer that fits no architecture, against the closest candidate.
    for shapes, source, network in ((encoder_shapes, encoder_source, "encoder"),
                                    (decoder_shapes, decoder_source, "decoder")):
        if any(_matches(shapes, arch.config, network) for arch in known):
            continue
        closest, closest_index = None, -1
        for arch in known:
            index = _first_mismatch(shapes, network_shapes(arch.config, network))
            if index is not None and index > closest_index:
                closest, closest_index = arch, index
        want = network_shapes(closest.config, network)[closest_index]
        raise ReferenceWeightsError(
            f"{source}: layer {_layer_name(network, closest_index)} has shape "
            f"{tuple(shapes[closest_index])}, but the closest known architecture "
            f"({closest.label}) expects {want}; the file fits no known ComDefend "
            f"{network} ({'; '.join(a.label for a in known)})")
    raise AssertionError("unreachable: every case above raises or returns")


# ----------------------------------------------------------------------------------- loading
def assign_weights(model, encoder_arrays: Sequence[np.ndarray],
                   decoder_arrays: Sequence[np.ndarray]) -> None:
    """Copies released arrays into ``model.encoder`` / ``model.decoder`` convolutions in order.

    Kernels go in unchanged: the release already uses Keras' HWIO layout and TensorFlow's
    cross-correlation. Raises ``ReferenceWeightsError`` naming the layer on a shape mismatch.
    """
    for network_model, arrays, prefix in ((model.encoder, encoder_arrays, "comcnn"),
                                          (model.decoder, decoder_arrays, "rescnn")):
        for index in range(len(arrays) // 2):
            layer = network_model.get_layer(f"{prefix}_conv{index + 1}")
            kernel, bias = arrays[2 * index], arrays[2 * index + 1]
            have = [tuple(w.shape) for w in layer.get_weights()]
            if have != [kernel.shape, bias.shape]:
                raise ReferenceWeightsError(
                    f"layer {layer.name}: model expects {have}, file holds "
                    f"{[kernel.shape, bias.shape]}")
            layer.set_weights([kernel, bias])


def read_reference_pair(encoder_path: str, decoder_path: str):
    """Reads both files and infers their architecture: every check of the import but the model.

    Returns ``(architecture, encoder_arrays, decoder_arrays)`` (a ``KnownArchitecture`` and two
    lists of 18 float32 arrays). Raises ``FileNotFoundError`` or ``ReferenceWeightsError``
    (see ``read_weight_arrays`` and ``infer_architecture``); builds no model.
    """
    encoder_arrays = read_weight_arrays(encoder_path)
    decoder_arrays = read_weight_arrays(decoder_path)
    architecture = infer_architecture(encoder_arrays, decoder_arrays, encoder_path, decoder_path)
    return architecture, encoder_arrays, decoder_arrays


def load_reference_model(encoder_path: str, decoder_path: str,
                         inference_noise_std: float = 0.0, inference_mode: str | None = None,
                         seed: int | None = None):
    """Builds the matching ``ComDefend`` and loads the authors' weights into it.

    Args:
      encoder_path: the ComCNN file (``enc20_0.0001.npy`` or ``enc_mnist.npy``).
      decoder_path: the ResCNN file (``dec20_0.0001.npy`` or ``dec_mnist.npy``).
      inference_noise_std: standard deviation of the test-time code noise (the release ran with
        1.0; 0 is deterministic).
      inference_mode: ``hard`` or ``soft``; None keeps the architecture's default (``hard``
        for the RGB release, ``soft`` for the Fashion-MNIST release, as the authors ran them).
      seed: seed of the inference noise.

    Returns:
      ``(model, provenance)``: the ``ComDefend`` (float32 images ``[B, H, W, C]`` in [0, 1]
      -> purified, same shape) and a JSON-serialisable dict describing the source files.
    """
    architecture, encoder_arrays, decoder_arrays = read_reference_pair(encoder_path,
                                                                       decoder_path)
    changes = {"inference_noise_std": float(inference_noise_std)}
    if inference_mode is not None:
        changes["inference_mode"] = inference_mode
    config = architecture.config.replace(**changes)

    from comdefend_tf.model import ComDefend  # keeps this module importable without keras

    model = ComDefend(config, seed=seed)
    assign_weights(model, encoder_arrays, decoder_arrays)
    provenance = {"architecture": architecture.label, "config_name": config.name}
    for role, path, arrays in (("encoder", encoder_path, encoder_arrays),
                               ("decoder", decoder_path, decoder_arrays)):
        digest = file_sha256(path)
        provenance[f"{role}_file"] = os.path.abspath(path)
        provenance[f"{role}_sha256"] = digest
        provenance[f"{role}_parameters"] = int(sum(a.size for a in arrays))
        provenance[f"{role}_released_as"] = (
            f"{RELEASED_FILES_SHA256[digest]} ({RELEASE_SOURCE})"
            if digest in RELEASED_FILES_SHA256 else None)
    return model, provenance


# ------------------------------------------------------------------ uint8 conversion, statistics
def truncate_to_uint8(images) -> np.ndarray:
    """The release's conversion: ``(y * 255).astype(uint8)`` in float32 (truncation).

    ``images``: float array in [0, 1]; returns uint8 of the same shape. Biased low by half a
    grey level on average; use ``round_to_uint8`` (``image_io.to_uint8``) for anything but
    reproducing their files.
    """
    scaled = np.asarray(images, dtype=np.float32) * np.float32(255)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def uint8_agreement(ours, theirs) -> dict[str, float]:
    """How closely two uint8 images (same shape) agree.

    Returns ``exact`` (fraction of equal values), ``mean_abs`` (mean absolute difference in
    1/255 units), ``within_1`` (fraction at most 1 apart), ``max_abs`` and ``psnr_db`` (PSNR of
    one against the other on 0..255; inf when identical).
    """
    ours = np.asarray(ours)
    theirs = np.asarray(theirs)
    if ours.shape != theirs.shape:
        raise ValueError(f"shapes differ: {ours.shape} vs {theirs.shape}")
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    return {"exact": float(np.mean(diff == 0)), "mean_abs": float(np.mean(diff)),
            "within_1": float(np.mean(diff <= 1)), "max_abs": int(diff.max()),
            "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))}


def code_statistics(code_logits) -> dict[str, float]:
    """How binary a code is, from its logits (any shape, float).

    Returns ``values``, ``median_abs`` (median |logit|), ``below_1`` and ``below_0_1`` (fractions
    with |logit| < 1 and < 0.1: bits that a little noise or a rounding error can flip),
    ``max_abs``, ``ones`` (fraction of bits set at sigma 0) and ``flip_rate_sigma1`` (expected
    fraction of bits flipped by N(0, 1) inference noise: mean of Phi(-|logit|)).
    """
    from math import erfc, sqrt

    logits = np.asarray(code_logits, dtype=np.float64).ravel()
    magnitude = np.abs(logits)
    flip = np.vectorize(lambda v: 0.5 * erfc(v / sqrt(2.0)), otypes=[np.float64])
    # Phi(-|l|) underflows to 0 for |l| > 40; evaluate only where it can matter.
    small = magnitude[magnitude < 40.0]
    flip_rate = float(np.sum(flip(small)) / logits.size) if logits.size else 0.0
    return {"values": int(logits.size), "median_abs": float(np.median(magnitude)),
            "below_1": float(np.mean(magnitude < 1.0)),
            "below_0_1": float(np.mean(magnitude < 0.1)), "max_abs": float(magnitude.max()),
            "ones": float(np.mean(logits > 0)), "flip_rate_sigma1": flip_rate}
