"""A zip reader for one weight file, written so that no file can make it run code, crash, or
read and allocate more than the limits below.

``read_weights_member(path) -> WeightsMember`` reads a regular file of at most
``MAX_FILE_BYTES`` once (the type and size checked on the open descriptor, opened with
``O_NONBLOCK`` so a FIFO cannot block), hashes exactly those bytes (``sha256``: the path is never
opened again, so a file swapped after the read cannot change what is recorded), and returns the
uncompressed bytes of its one member ``w.npy``: a zip archive holding exactly that member, stored
or deflated (the two methods numpy writes), not encrypted, not ZIP64, not split, declaring at
most ``MAX_MEMBER_BYTES``. The member is inflated in ``READ_CHUNK_BYTES`` pieces, each bounded so
that the output never passes its declared size by more than one byte; its CRC-32 must match.
Anything else raises ``ReferenceWeightsError`` naming the file and the problem (a plain ``.npy``
file included); a missing path raises ``FileNotFoundError``. Neither ``zipfile`` nor any of its
exceptions is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import struct
import zlib
from typing import Sequence

from comdefend_tf.io import bounded
from comdefend_tf.weights.errors import ReferenceWeightsError

WEIGHTS_MEMBER = "w.npy"

# Limits on what a weight file may make us read, allocate or interpret. A released file is
# 3.5 MB, unpacks to 4.9 MB and runs about 850 pickle operations; each limit leaves a wide
# margin above that while bounding the memory and time a crafted file can cost.
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_MEMBER_BYTES = 64 * 1024 * 1024
MAX_ARCHIVE_MEMBERS = 16  # a weight file holds one; up to this many are parsed to be named
READ_CHUNK_BYTES = 64 * 1024


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


@dataclasses.dataclass(frozen=True)
class WeightsMember:
    """What one read of a weight file gave: ``data`` (the ``w.npy`` bytes), ``sha256`` (hex,
    of the file bytes that were parsed) and ``file_bytes`` (how many there were)."""

    data: bytes
    sha256: str
    file_bytes: int


def read_whole_file(path: str) -> bytes:
    """The bytes of ``path``, read once, if it is a regular file within ``MAX_FILE_BYTES``.

    ``O_NONBLOCK`` keeps a FIFO from blocking the open; the type and size are checked on the
    open descriptor (``fstat``), so a path swapped before the open cannot slip a device or FIFO
    in, and reading stops one byte past the cap, so a file that grows after the check cannot
    make us read more.
    """
    try:
        return bounded.read_regular_file(path, MAX_FILE_BYTES)
    except FileNotFoundError:
        raise FileNotFoundError(f"no weight file at {path!r}") from None
    except bounded.NotRegularFileError:
        raise ReferenceWeightsError(
            f"{path}: not a regular file (a directory, device, FIFO or socket); a weight "
            f"file is an npz (zip) archive") from None
    except bounded.FileTooLargeError as error:
        if error.grew:
            raise ReferenceWeightsError(
                f"{path}: grew past the {MAX_FILE_BYTES} bytes a weight file may have while it "
                f"was read") from None
        raise ReferenceWeightsError(
            f"{path}: {error.size} bytes, more than the {MAX_FILE_BYTES} a weight file may "
            f"have (a released file is about 3.5 MB)") from None
    except bounded.FileReadError as error:  # an I/O error while reading a file that opened
        raise ReferenceWeightsError(
            f"{path}: cannot read: {error.error.strerror or error.error}") from None
    except OSError as error:
        raise ReferenceWeightsError(f"{path}: cannot open: {error.strerror or error}") from None


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


def read_weights_member(path: str) -> WeightsMember:
    """Reads the weight file at ``path`` once; returns its ``w.npy`` bytes and the sha256 of
    the file bytes they came from (see the module docstring for what is accepted)."""
    content = read_whole_file(path)
    digest = hashlib.sha256(content).hexdigest()
    handle = io.BytesIO(content)  # parsed from the bytes that were hashed, never the path
    members, directory_offset = _zip_members(handle, len(content), path)
    member = _select_weights_member(members, path)
    data = _read_member(handle, member, directory_offset, path)
    return WeightsMember(data, digest, len(content))
