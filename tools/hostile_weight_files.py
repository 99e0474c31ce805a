r"""Builds a corpus of hostile weight files and checks that the importer refuses every one.

    python tools/hostile_weight_files.py [--output results.json] [--keep DIR] [--bomb-mib 1024]

Each case is a file (or path) crafted against one layer of the reader in
``comdefend_tf/weights/importer.py``: the file itself (FIFOs, devices, oversized files), the zip
container (bombs, encryption, compression methods, corrupt and truncated archives, member
names), the ``.npy`` header, and the pickle (code execution through ``REDUCE``, ``INST``,
``OBJ``, ``NEWOBJ``, ``STACK_GLOBAL``, extension codes and persistent ids; numpy callables that
read files or memory; ``numpy.ndarray`` called over raw pointers; array states with huge,
negative or mismatched shapes, object dtypes over raw bytes, nested object arrays, non-float
dtypes, memo and stack abuse), and finally files that parse but hold non-finite values or
shapes that fit no released architecture.

Every file is imported in its own child process (``os.fork`` of this one, so a segmentation
fault is counted instead of ending the run) through ``reference.read_reference_pair``: the
importer's whole read-and-check path, with a valid decoder file as the partner, stopping
before a Keras model would be built. The child's address space may grow by at most
``--memory-limit-mib`` (``RLIMIT_AS``), so a regression cannot exhaust the machine; it then
shows up as a ``MemoryError``. A case is a pass when the child raises
``ReferenceWeightsError``; a crash (signal), a timeout, any other exception, acceptance, or a
sentinel file created by the payload (code ran) is a failure. Two control files (numpy-written
and written by this script's own pickle assembler) must be accepted, which shows that the
refusals come from the hostile part and not from the assembler.

Prints one row per case (outcome, the child's peak RSS and how much it grew while importing,
the importer's message), then totals; ``--output`` also writes the rows as JSON. Exits 1 when
any hostile file is not refused cleanly or a control is not accepted, else 0. Linux only
(fork, ``/proc/self/status``, ``wait4``).
"""

from __future__ import annotations

import argparse
import bz2
import dataclasses
import faulthandler
import io
import json
import lzma
import os
import pickle
import platform
import resource
import select
import signal
import struct
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comdefend_tf.weights import importer as reference  # noqa: E402  (after the path fix above)
from comdefend_tf.config import get_config  # noqa: E402

REFUSED, ACCEPTED, CRASHED = "refused", "accepted", "crashed"
OTHER_EXCEPTION, TIMED_OUT, CODE_RAN = "other exception", "timed out", "code ran"
ARRAY_COUNT = reference.ARRAYS_PER_NETWORK
NUMPY_CORE = "numpy.core.multiarray"  # what numpy 1 (and the release) writes


# ------------------------------------------------------------------------- pickle assembler
# Small builders of raw pickle bytes, so a case can hold exactly the opcodes it attacks with.
def op_global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def op_stack_global(module: str, name: str) -> bytes:
    return op_text(module) + op_text(name) + pickle.STACK_GLOBAL


def op_int(value: int) -> bytes:
    return pickle.BININT + struct.pack("<i", value)


def op_text(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def op_bytes(data: bytes) -> bytes:
    return pickle.BINBYTES + struct.pack("<I", len(data)) + data


def op_tuple(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def op_call(function: bytes, *arguments: bytes) -> bytes:
    return function + op_tuple(*arguments) + pickle.REDUCE


def op_dtype(code: str, byte_order: str = "<", flags: int | None = None,
             element_size: int = -1) -> bytes:
    if flags is None:
        flags = 63 if code == "O8" else 0
    return (op_call(op_global("numpy", "dtype"), op_text(code), pickle.NEWFALSE,
                    pickle.NEWTRUE)
            + op_tuple(op_int(3), op_text(byte_order), pickle.NONE, pickle.NONE, pickle.NONE,
                       op_int(element_size), op_int(-1), op_int(flags))
            + pickle.BUILD)


def op_empty_array() -> bytes:
    return op_call(op_global(NUMPY_CORE, "_reconstruct"), op_global("numpy", "ndarray"),
                   op_tuple(op_int(0)), op_bytes(b"b"))


def op_array_state(shape, dtype: bytes, data: bytes, fortran: bytes = pickle.NEWFALSE) -> bytes:
    return op_tuple(op_int(1), op_tuple(*(op_int(size) for size in shape)), dtype, fortran,
                    data) + pickle.BUILD


def op_float_array(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype="<f4")
    return op_empty_array() + op_array_state(array.shape, op_dtype("f4"),
                                             op_bytes(array.tobytes()))


def op_object_array(entries: list[bytes], length: int | None = None) -> bytes:
    items = pickle.EMPTY_LIST + pickle.MARK + b"".join(entries) + pickle.APPENDS
    return op_empty_array() + op_array_state(
        (len(entries) if length is None else length,), op_dtype("O8", "|"), items)


def op_raw_pointer_arguments() -> bytes:
    """``(18,), dtype('O'), 144 bytes``: numpy.ndarray's arguments for an object array of the
    header's length whose 18 "pointers" are 0x4141414141414141."""
    return (op_tuple(op_int(ARRAY_COUNT)) + op_dtype("O8", "|")
            + op_bytes(b"\x41" * 8 * ARRAY_COUNT))


def whole_pickle(body: bytes, protocol: int = 2) -> bytes:
    return pickle.PROTO + bytes([protocol]) + body + pickle.STOP


# --------------------------------------------------------------------- .npy and zip builders
# Written from the formats' specifications (numpy's NEP 1, PKWARE's APPNOTE), independently of
# the reader under test; the controls show these builders produce files it accepts.
NPY_MAGIC = b"\x93NUMPY"
LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # signature ... name length, extra length
CENTRAL_ENTRY = struct.Struct("<4sHHHHHHIIIHHHHHII")
END_RECORD = struct.Struct("<4sHHHHIIH")
def npy_header(header_text: str, version=(1, 0)) -> bytes:
    """Magic, version and a header dict text padded like numpy's (no validation)."""
    length_bytes = 2 if version[0] == 1 else 4
    raw = header_text.encode("latin1")
    total = len(NPY_MAGIC) + 2 + length_bytes + len(raw) + 1
    raw += b" " * (-total % 64) + b"\n"
    layout = "<H" if length_bytes == 2 else "<I"
    return NPY_MAGIC + bytes(version) + struct.pack(layout, len(raw)) + raw


def object_npy(pickle_bytes: bytes, shape=(ARRAY_COUNT,)) -> bytes:
    return npy_header(f"{{'descr': '|O', 'fortran_order': False, 'shape': {shape}, }}") + \
        pickle_bytes


def numpy_object_npy(entries, protocol: int = 2) -> bytes:
    """What ``np.save`` writes for an object array holding ``entries`` (numpy's own pickler)."""
    return object_npy(pickle.dumps(object_array(entries), protocol=protocol), (len(entries),))


def object_array(entries) -> np.ndarray:
    """A 1-D object array holding ``entries`` (numpy would stack equal shapes otherwise)."""
    array = np.empty(len(entries), dtype=object)
    for index, entry in enumerate(entries):
        array[index] = entry
    return array


def zip_with_member(member: bytes, name: str = reference.WEIGHTS_MEMBER,
                    method: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A well-formed archive, written by ``zipfile``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method, compresslevel=1) as archive:
        archive.writestr(name, member)
    return buffer.getvalue()


@dataclasses.dataclass
class RawMember:
    """A zip member written field by field (no consistency enforced)."""

    data: bytes  # as stored (already compressed)
    size: int  # declared uncompressed size
    crc32: int
    method: int = zipfile.ZIP_DEFLATED
    name: bytes = reference.WEIGHTS_MEMBER.encode()
    flags: int = 0
    local_name: bytes | None = None
    disk: int = 0
    header_offset: int | None = None
    compressed_size: int | None = None


def raw_zip(members: list[RawMember], *, entries: int | None = None, disk: int = 0,
            directory_offset: int | None = None, comment: bytes = b"") -> bytes:
    """Local headers, data, central directory and end record exactly as given."""
    out, offsets = bytearray(), []
    for member in members:
        offsets.append(len(out))
        local_name = member.name if member.local_name is None else member.local_name
        compressed = (len(member.data) if member.compressed_size is None
                      else member.compressed_size)
        out += LOCAL_HEADER.pack(
            b"PK\x03\x04", 20, member.flags, member.method, 0, 0x21, member.crc32,
            compressed, member.size, len(local_name), 0) + local_name + member.data
    start = len(out)
    for member, offset in zip(members, offsets):
        compressed = (len(member.data) if member.compressed_size is None
                      else member.compressed_size)
        out += CENTRAL_ENTRY.pack(
            b"PK\x01\x02", 20, 20, member.flags, member.method, 0, 0x21,
            member.crc32, compressed, member.size, len(member.name), 0, 0, member.disk, 0, 0,
            offset if member.header_offset is None else member.header_offset) + member.name
    count = len(members) if entries is None else entries
    out += END_RECORD.pack(
        b"PK\x05\x06", disk, disk, count, count, len(out) - start,
        start if directory_offset is None else directory_offset, len(comment)) + comment
    return bytes(out)


def deflate(data: bytes) -> bytes:
    """Raw deflate data, as in a zip member (fast level: the corpus is rebuilt every run)."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def _zeros_stream(compressor, mib: int) -> tuple[bytes, int]:
    block, pieces, crc = bytes(1 << 20), [], 0
    for _ in range(mib):
        pieces.append(compressor.compress(block))
        crc = zlib.crc32(block, crc)
    pieces.append(compressor.flush())
    return b"".join(pieces), crc


def deflate_bomb(mib: int) -> tuple[bytes, int]:
    """Raw deflate data that inflates to ``mib`` MiB of zeros, and its CRC-32."""
    return _zeros_stream(zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS), mib)


def bzip2_bomb(mib: int) -> tuple[bytes, int]:
    return _zeros_stream(bz2.BZ2Compressor(9), mib)


def lzma_bomb(mib: int) -> tuple[bytes, int]:
    """A zip LZMA member (method 14): version, properties, then a raw LZMA1 stream."""
    dictionary = 1 << 20
    filters = [{"id": lzma.FILTER_LZMA1, "preset": 0, "dict_size": dictionary, "lc": 3,
                "lp": 0, "pb": 2}]
    stream, crc = _zeros_stream(lzma.LZMACompressor(format=lzma.FORMAT_RAW, filters=filters),
                                mib)
    properties = bytes([(2 * 5 + 0) * 9 + 3]) + struct.pack("<I", dictionary)
    return b"\x09\x04" + struct.pack("<H", len(properties)) + properties + stream, crc


# ------------------------------------------------------------------------------- the corpus
@dataclasses.dataclass
class Context:
    """What the cases share: the folder, valid material and the bomb size."""

    folder: Path
    bomb_mib: int
    valid_member: bytes  # w.npy of a valid paper-width encoder (numpy-written)
    valid_arrays: list
    _cache: dict = dataclasses.field(default_factory=dict)

    def deflated_member(self) -> bytes:
        """``valid_member`` as raw deflate data (computed once)."""
        return self._cached("member", lambda: deflate(self.valid_member))

    def bomb(self, kind: str) -> tuple[bytes, int]:
        """``(data, crc32)`` of a ``bomb_mib`` MiB bomb of ``kind`` (computed once)."""
        builders = {"deflate": deflate_bomb, "bzip2": bzip2_bomb, "lzma": lzma_bomb}
        return self._cached(kind, lambda: builders[kind](self.bomb_mib))

    def _cached(self, key: str, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def sentinel(self, name: str) -> Path:
        return self.folder / f"{name}.code_ran"


@dataclasses.dataclass(frozen=True)
class Case:
    """One hostile file: ``build(context, path)`` writes it at ``path``."""

    name: str
    layer: str
    description: str
    build: Callable[[Context, Path], None]
    expect: str = REFUSED


CASES: list[Case] = []


def case(layer: str, description: str, expect: str = REFUSED):
    def register(build):
        CASES.append(Case(build.__name__, layer, description, build, expect))
        return build
    return register


def _write_member(path: Path, member: bytes) -> None:
    path.write_bytes(zip_with_member(member))


def _write_pickle(path: Path, body: bytes, protocol: int = 2, shape=(ARRAY_COUNT,)) -> None:
    _write_member(path, object_npy(whole_pickle(body, protocol), shape))


def _small_float(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(3, 3, 2, 2)).astype(np.float32)


# Controls: must be accepted.
@case("control", "valid paper-width encoder written by np.savez_compressed", expect=ACCEPTED)
def control_numpy_written(context, path):
    _write_member(path, context.valid_member)


@case("control", "valid encoder written by this script's pickle assembler (protocol 2)",
      expect=ACCEPTED)
def control_assembled(context, path):
    _write_pickle(path, op_object_array([op_float_array(a) for a in context.valid_arrays]))


@case("control", "valid encoder in an archive written field by field by raw_zip (the "
      "builder of the zip cases)", expect=ACCEPTED)
def control_raw_zip(context, path):
    path.write_bytes(raw_zip([_valid_raw_member(context)]))


@case("control", "valid encoder as big-endian float64 arrays (numpy-written, protocol 2)",
      expect=ACCEPTED)
def control_big_endian_float64(context, path):
    _write_member(path, numpy_object_npy([a.astype(">f8") for a in context.valid_arrays]))


# The file itself.
@case("file", "a directory named like a weight file")
def directory_path(context, path):
    path.mkdir()


@case("file", "a FIFO: opening it must not block, reading it must not hang")
def fifo(context, path):
    os.mkfifo(path)


@case("file", "a symlink to /dev/zero (endless bytes)")
def symlink_to_dev_zero(context, path):
    os.symlink("/dev/zero", path)


@case("file", "a sparse file of MAX_FILE_BYTES + 1 bytes")
def oversized_file(context, path):
    with open(path, "wb") as handle:
        handle.truncate(reference.MAX_FILE_BYTES + 1)


@case("file", "an empty file")
def empty_file(context, path):
    path.write_bytes(b"")


@case("file", "random bytes")
def random_bytes(context, path):
    path.write_bytes(np.random.default_rng(7).bytes(4096))


@case("file", "a plain .npy whose pickle calls os.system (np.load(allow_pickle=True) would)")
def plain_npy_with_code(context, path):
    sentinel = context.sentinel(path.stem)
    path.write_bytes(object_npy(whole_pickle(
        op_call(op_global("os", "system"), op_text(f"touch {sentinel}")))))


# The zip container.
@case("zip", "deflate bomb: declares 4 KiB, inflates to --bomb-mib MiB of zeros")
def deflate_bomb_small_declared(context, path):
    data, crc = context.bomb("deflate")
    path.write_bytes(raw_zip([RawMember(data, 4096, crc)]))


@case("zip", "deflate bomb declaring its true size (beyond MAX_MEMBER_BYTES)")
def deflate_bomb_true_size(context, path):
    data, crc = context.bomb("deflate")
    path.write_bytes(raw_zip([RawMember(data, min(context.bomb_mib << 20, 0xFFFFFFFE), crc)]))


@case("zip", "deflate bomb declaring just under MAX_MEMBER_BYTES")
def deflate_bomb_declared_at_cap(context, path):
    data, crc = context.bomb("deflate")
    path.write_bytes(raw_zip([RawMember(data, reference.MAX_MEMBER_BYTES - 1, crc)]))


@case("zip", "bzip2 bomb (method 12): declares 4 KiB, inflates to --bomb-mib MiB")
def bzip2_bomb_small_declared(context, path):
    data, crc = context.bomb("bzip2")
    path.write_bytes(raw_zip([RawMember(data, 4096, crc, method=zipfile.ZIP_BZIP2)]))


@case("zip", "LZMA bomb (method 14): declares 4 KiB, inflates to --bomb-mib MiB")
def lzma_bomb_small_declared(context, path):
    data, crc = context.bomb("lzma")
    path.write_bytes(raw_zip([RawMember(data, 4096, crc, method=zipfile.ZIP_LZMA)]))


def _valid_raw_member(context, **changes) -> RawMember:
    member = context.valid_member
    return RawMember(context.deflated_member(), len(member), zlib.crc32(member), **changes)


@case("zip", "the member is flagged encrypted (traditional PKWARE encryption)")
def encrypted_member(context, path):
    path.write_bytes(raw_zip([_valid_raw_member(context, flags=0x1)]))


@case("zip", "AES-encrypted member (method 99)")
def aes_method(context, path):
    path.write_bytes(raw_zip([_valid_raw_member(context, method=99)]))


@case("zip", "an unknown compression method (77)")
def unknown_method(context, path):
    path.write_bytes(raw_zip([_valid_raw_member(context, method=77)]))


@case("zip", "a stored member whose declared size is less than its data")
def stored_size_mismatch(context, path):
    member = context.valid_member
    path.write_bytes(raw_zip([RawMember(member, 100, zlib.crc32(member),
                                        method=zipfile.ZIP_STORED)]))


@case("zip", "a valid archive cut in half")
def truncated_archive(context, path):
    whole = zip_with_member(context.valid_member)
    path.write_bytes(whole[:len(whole) // 2])


@case("zip", "a valid archive missing its last 10 bytes (a cut end record)")
def truncated_end_record(context, path):
    path.write_bytes(zip_with_member(context.valid_member)[:-10])


@case("zip", "a wrong CRC-32 for an intact member")
def corrupt_crc(context, path):
    member = context.valid_member
    path.write_bytes(raw_zip([RawMember(context.deflated_member(), len(member),
                                        zlib.crc32(member) ^ 0xFFFF)]))


@case("zip", "deflate data with 64 bytes overwritten in the middle")
def corrupt_deflate_data(context, path):
    member = context.valid_member
    data = bytearray(context.deflated_member())
    middle = len(data) // 2
    data[middle:middle + 64] = b"\xff" * 64
    path.write_bytes(raw_zip([RawMember(bytes(data), len(member), zlib.crc32(member))]))


@case("zip", "deflate data whose stream stops early")
def unterminated_deflate(context, path):
    member = context.valid_member
    data = context.deflated_member()[:-100]
    path.write_bytes(raw_zip([RawMember(data, len(member), zlib.crc32(member))]))


@case("zip", "10,000 members")
def many_members(context, path):
    members = [RawMember(b"", 0, 0, method=zipfile.ZIP_STORED, name=f"m{i}.npy".encode())
               for i in range(10_000)]
    path.write_bytes(raw_zip(members))


@case("zip", "two members both named w.npy")
def duplicate_w_members(context, path):
    path.write_bytes(raw_zip([_valid_raw_member(context), _valid_raw_member(context)]))


@case("zip", "w.npy plus a second member")
def extra_member(context, path):
    path.write_bytes(raw_zip([_valid_raw_member(context),
                              RawMember(b"x", 1, zlib.crc32(b"x"), method=zipfile.ZIP_STORED,
                                        name=b"payload.sh")]))


@case("zip", "zip-slip member name ../../w.npy")
def zip_slip_name(context, path):
    path.write_bytes(raw_zip([_valid_raw_member(context, name=b"../../w.npy")]))


@case("zip", "absolute member name /tmp/w.npy")
def absolute_member_name(context, path):
    path.write_bytes(raw_zip([_valid_raw_member(context, name=b"/tmp/w.npy")]))


@case("zip", "the local header names another file than the central directory")
def local_name_mismatch(context, path):
    path.write_bytes(raw_zip([_valid_raw_member(context, local_name=b"x.npy")]))


@case("zip", "the central directory points the member at an offset beyond the file")
def header_offset_outside(context, path):
    path.write_bytes(raw_zip([_valid_raw_member(context, header_offset=0x7FFFFFF0)]))


@case("zip", "a compressed size running past the central directory")
def compressed_size_too_large(context, path):
    path.write_bytes(raw_zip([_valid_raw_member(context, compressed_size=0x7FFFFFF0)]))


@case("zip", "ZIP64 marker in the end record (65535 entries)")
def zip64_end_record(context, path):
    path.write_bytes(raw_zip([_valid_raw_member(context)], entries=0xFFFF))


@case("zip", "a split (multi-disk) archive")
def split_archive(context, path):
    path.write_bytes(raw_zip([_valid_raw_member(context)], disk=1))


@case("zip", "the end record's directory offset points into the member data")
def directory_offset_wrong(context, path):
    path.write_bytes(raw_zip([_valid_raw_member(context)], directory_offset=10))


@case("zip", "w.npy is itself a zip archive (nested)")
def nested_zip(context, path):
    _write_member(path, zip_with_member(context.valid_member))


@case("zip", "an end record whose comment length runs past the end of the file")
def end_record_comment_cut(context, path):
    whole = bytearray(raw_zip([_valid_raw_member(context)], comment=b"abcd"))
    struct.pack_into("<H", whole, len(whole) - 4 - 2, 100)
    path.write_bytes(bytes(whole))


@case("zip", "an end record forged at the end of the comment, pointing at a fake directory")
def forged_end_record(context, path):
    whole = raw_zip([_valid_raw_member(context)])
    fake = END_RECORD.pack(b"PK\x05\x06", 0, 0, 1, 1, 46, 0, 0)
    path.write_bytes(whole[:-2] + struct.pack("<H", len(fake)) + fake)


# The .npy header.
@case("npy", "w.npy holds a plain float array, not an object array")
def header_float_array(context, path):
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(ARRAY_COUNT, np.float32))
    _write_member(path, buffer.getvalue())


@case("npy", "the header declares an object array of shape (10**12,)")
def header_huge_object_shape(context, path):
    _write_member(path, object_npy(whole_pickle(op_object_array([])), (10 ** 12,)))


@case("npy", "the header's shape (18,) but the pickle holds 3 entries")
def header_shape_mismatch(context, path):
    entries = [op_float_array(_small_float(i)) for i in range(3)]
    _write_pickle(path, op_object_array(entries))


@case("npy", "a header of 100,000 bytes (version 2.0)")
def header_oversized(context, path):
    _write_member(path, npy_header("{'descr': '|O', 'fortran_order': False, 'shape': (18,), "
                                   + " " * 100_000 + "}", version=(2, 0)))


@case("npy", "a header that is Python code, not a literal")
def header_code(context, path):
    _write_member(path, npy_header("{'descr': __import__('os').system('true'), "
                                   "'fortran_order': False, 'shape': (18,), }"))


@case("npy", "a header nesting 2,000 parentheses (parser recursion)")
def header_deep_nesting(context, path):
    _write_member(path, npy_header("{'descr': '|O', 'fortran_order': False, 'shape': "
                                   + "(" * 2000 + ")" * 2000 + "}"))


@case("npy", ".npy format version 3.0")
def header_version_3(context, path):
    _write_member(path, npy_header("{'descr': '|O', 'fortran_order': False, 'shape': (18,), }",
                                   version=(3, 0)))


# The pickle: code execution.
def _command_case(case_name: str, module: str, name: str,
                  argument: Callable[[Path], bytes], protocol: int = 2,
                  stack_global: bool = False):
    def build(context, path):
        sentinel = context.sentinel(path.stem)
        function = op_stack_global(module, name) if stack_global else op_global(module, name)
        _write_pickle(path, op_call(function, argument(sentinel)), protocol)
    build.__name__ = case_name
    return build


def _shell(sentinel: Path) -> bytes:
    return op_text(f"touch {sentinel}")


def _python(sentinel: Path) -> bytes:
    return op_text(f"open({str(sentinel)!r}, 'w').write('x')")


def _file_argument(sentinel: Path) -> bytes:
    return op_text("/etc/passwd")


# (name, description, module, function, argument, protocol, via STACK_GLOBAL)
_CALL_CASES = [
    ("reduce_os_system", "REDUCE of os.system('touch ...')", "os", "system", _shell, 2, False),
    ("reduce_posix_system", "REDUCE of posix.system (os.system's real module)", "posix",
     "system", _shell, 2, False),
    ("reduce_builtins_eval", "REDUCE of builtins.eval", "builtins", "eval", _python, 2, False),
    ("stack_global_exec", "STACK_GLOBAL builtins.exec, protocol 4", "builtins", "exec",
     _python, 4, True),
    ("reduce_subprocess", "REDUCE of subprocess.getoutput", "subprocess", "getoutput", _shell,
     2, False),
    ("numpy_load_global", "numpy.load of another (pickled) file", "numpy", "load",
     _file_argument, 2, False),
    ("numpy_frombuffer_global", "numpy.frombuffer (an array over bytes a file chooses)",
     "numpy", "frombuffer", lambda sentinel: op_bytes(b"\0" * 16), 2, False),
    ("numpy_ctypeslib_global", "numpy.ctypeslib.as_array over a raw address",
     "numpy.ctypeslib", "as_array", lambda sentinel: op_int(4096), 2, False),
    ("numpy_read_array_global", "numpy.lib.format.read_array (an unrestricted load)",
     "numpy.lib.format", "read_array", _file_argument, 2, False),
    ("stack_global_allowed_ndarray", "STACK_GLOBAL of an allowed name (numpy.ndarray) called "
     "over raw pointers, protocol 4", "numpy", "ndarray",
     lambda sentinel: op_raw_pointer_arguments(), 4, True),
]
for (_name, _description, _module, _function, _argument, _protocol,
     _stack_global) in _CALL_CASES:
    case("pickle", _description)(
        _command_case(_name, _module, _function, _argument, _protocol, _stack_global))


@case("pickle", "builtins.getattr(numpy.ndarray, '__new__'): a callable built from allowed names")
def getattr_chain(context, path):
    _write_pickle(path, op_call(op_global("builtins", "getattr"), op_global("numpy", "ndarray"),
                                op_text("__new__")))


@case("pickle", "numpy.ndarray((18,), dtype('O'), buffer=144 raw bytes): object pointers "
      "from the file (segfaults an unpickler that only allow-lists names)")
def ndarray_over_raw_pointers(context, path):
    _write_pickle(path, op_global("numpy", "ndarray") + pickle.MARK
                  + op_raw_pointer_arguments() + pickle.TUPLE + pickle.REDUCE)


@case("pickle", "NEWOBJ of numpy.ndarray with a raw buffer (ndarray.__new__ over pointers)")
def newobj_ndarray(context, path):
    _write_pickle(path, op_global("numpy", "ndarray") + pickle.MARK
                  + op_raw_pointer_arguments() + pickle.TUPLE + pickle.NEWOBJ)


@case("pickle", "NEWOBJ_EX (protocol 4) of numpy.ndarray")
def newobj_ex_ndarray(context, path):
    _write_pickle(path, op_stack_global("numpy", "ndarray") + op_tuple(op_tuple(op_int(2)))
                  + op_tuple() + pickle.NEWOBJ_EX, protocol=4)


@case("pickle", "INST opcode: os system with a shell command")
def inst_opcode(context, path):
    _write_pickle(path, pickle.MARK + _shell(context.sentinel(path.stem)) + pickle.INST
                  + b"os\nsystem\n")


@case("pickle", "OBJ opcode: numpy.ndarray (an allowed name) over raw pointers")
def obj_opcode(context, path):
    _write_pickle(path, pickle.MARK + op_global("numpy", "ndarray")
                  + op_raw_pointer_arguments() + pickle.OBJ)


@case("pickle", "EXT1 opcode (the copyreg extension registry)")
def ext1_opcode(context, path):
    _write_pickle(path, pickle.EXT1 + b"\x01" + op_tuple() + pickle.REDUCE)


@case("pickle", "PERSID opcode (persistent id)")
def persid_opcode(context, path):
    _write_pickle(path, pickle.PERSID + b"os.system\n")


@case("pickle", "BINPERSID opcode (persistent id from the stack)")
def binpersid_opcode(context, path):
    _write_pickle(path, op_text("os.system") + pickle.BINPERSID)


@case("pickle", "protocol 5 with an out-of-band buffer (NEXT_BUFFER)")
def protocol5_next_buffer(context, path):
    _write_pickle(path, pickle.NEXT_BUFFER, protocol=5)


@case("pickle", "a protocol 0 (text) pickle, as old pickles are")
def protocol0_pickle(context, path):
    array = np.empty(1, dtype=object)
    array[0] = _small_float()
    _write_member(path, object_npy(pickle.dumps(array, protocol=0), (1,)))


# The pickle: numpy reconstruction with hostile arguments and states.
@case("pickle", "_reconstruct(ndarray, (2**31 - 1,), b'b'): asks for a 2 GiB array")
def reconstruct_huge_shape(context, path):
    _write_pickle(path, op_call(op_global(NUMPY_CORE, "_reconstruct"),
                                op_global("numpy", "ndarray"), op_tuple(op_int(2 ** 31 - 1)),
                                op_bytes(b"b")))


@case("pickle", "_reconstruct with a shape of 10**12 (a LONG1 integer)")
def reconstruct_long_shape(context, path):
    _write_pickle(path, op_call(op_global(NUMPY_CORE, "_reconstruct"),
                                op_global("numpy", "ndarray"),
                                op_tuple(pickle.LONG1 + b"\x06" + (10 ** 12).to_bytes(6, "little")),
                                op_bytes(b"b")))


@case("pickle", "_reconstruct of numpy.ma.MaskedArray (a subclass with its own state)")
def reconstruct_subclass(context, path):
    _write_pickle(path, op_call(op_global(NUMPY_CORE, "_reconstruct"),
                                op_global("numpy.ma.core", "MaskedArray"),
                                op_tuple(op_int(0)), op_bytes(b"b")))


@case("pickle", "an object-dtype array state over 144 raw bytes (pointers) instead of a list")
def object_state_raw_bytes(context, path):
    _write_pickle(path, op_empty_array() + op_array_state(
        (ARRAY_COUNT,), op_dtype("O8", "|"), op_bytes(b"\x41" * 8 * ARRAY_COUNT)))


@case("pickle", "a float32 array state declaring shape (2**31-1, 2**31-1) with 4 bytes of data")
def huge_declared_float_shape(context, path):
    entry = op_empty_array() + op_array_state((2 ** 31 - 1, 2 ** 31 - 1), op_dtype("f4"),
                                              op_bytes(b"\0" * 4))
    _write_pickle(path, op_object_array([entry]), shape=(1,))


@case("pickle", "a float32 array state with shape (-1,)")
def negative_shape(context, path):
    entry = op_empty_array() + op_array_state((-1,), op_dtype("f4"), op_bytes(b""))
    _write_pickle(path, op_object_array([entry]), shape=(1,))


@case("pickle", "a float32 array of 5 dimensions")
def too_many_dimensions(context, path):
    entry = op_empty_array() + op_array_state((1, 1, 1, 1, 1), op_dtype("f4"),
                                              op_bytes(b"\0" * 4))
    _write_pickle(path, op_object_array([entry]), shape=(1,))


@case("pickle", "a float array's state set twice, the second time to an object dtype over raw "
      "bytes")
def state_set_twice(context, path):
    entry = (op_float_array(np.zeros(2, np.float32))
             + op_tuple(op_int(1), op_tuple(op_int(2)), op_dtype("O8", "|"), pickle.NEWFALSE,
                        op_bytes(b"\x41" * 16)) + pickle.BUILD)
    _write_pickle(path, op_object_array([entry]), shape=(1,))


@case("pickle", "dtype('f4') pickled with the object flags (63) and element size 8")
def dtype_state_tampered(context, path):
    entry = op_empty_array() + op_array_state((2,), op_dtype("f4", flags=63, element_size=8),
                                              op_bytes(b"\x41" * 16))
    _write_pickle(path, op_object_array([entry]), shape=(1,))


@case("pickle", "nested object arrays (numpy-written)")
def nested_object_array(context, path):
    inner = np.empty(2, dtype=object)
    inner[0], inner[1] = _small_float(1), _small_float(2)
    _write_member(path, numpy_object_npy([inner] + [_small_float()] * (ARRAY_COUNT - 1)))


@case("pickle", "an object array of strings (numpy-written)")
def object_array_of_strings(context, path):
    _write_member(path, numpy_object_npy(["w"] * ARRAY_COUNT))


@case("pickle", "an object array of None (numpy-written)")
def object_array_of_none(context, path):
    _write_member(path, numpy_object_npy([None] * ARRAY_COUNT))


@case("pickle", "int32 arrays of the released shapes (numpy-written, protocol 4)")
def int32_entries(context, path):
    _write_member(path, numpy_object_npy([a.astype(np.int32) for a in context.valid_arrays],
                                         protocol=4))


@case("pickle", "complex64 arrays (numpy-written)")
def complex_entries(context, path):
    _write_member(path, numpy_object_npy([_small_float().astype(np.complex64)] * ARRAY_COUNT))


@case("pickle", "a structured dtype with an object field (numpy-written)")
def structured_object_field(context, path):
    record = np.zeros(2, dtype=[("pointer", "O"), ("value", "f4")])
    _write_member(path, numpy_object_npy([record] * ARRAY_COUNT))


@case("pickle", "datetime64 arrays (numpy-written)")
def datetime_entries(context, path):
    _write_member(path, numpy_object_npy([np.zeros(3, "datetime64[s]")] * ARRAY_COUNT))


@case("pickle", "BINGET of a memo entry that was never stored")
def memo_undefined(context, path):
    _write_pickle(path, pickle.BINGET + b"\xc8")


@case("pickle", "an object array that lists itself (a cycle through the memo)")
def memo_self_cycle(context, path):
    body = (op_empty_array() + pickle.BINPUT + b"\x63"
            + op_tuple(op_int(1), op_tuple(op_int(1)), op_dtype("O8", "|"), pickle.NEWFALSE,
                       pickle.EMPTY_LIST + pickle.BINGET + b"\x63" + pickle.APPEND)
            + pickle.BUILD)
    _write_pickle(path, body, shape=(1,))


@case("pickle", "REDUCE on an empty stack")
def stack_underflow(context, path):
    _write_pickle(path, pickle.REDUCE)


@case("pickle", "200,000 MARKs (stack growth)")
def mark_flood(context, path):
    _write_pickle(path, pickle.MARK * 200_000)


@case("pickle", "300,000 BINPUTs of one value (an operation flood)")
def operation_flood(context, path):
    _write_pickle(path, pickle.NONE + (pickle.BINPUT + b"\x00") * 300_000)


@case("pickle", "one 1 MiB memo entry encoded 1,000 times (1 GiB from a small file)")
def memo_reuse_bomb(context, path):
    # Only allowed opcodes and globals; each copy stays on the stack (1,000 < its limit).
    text = op_text("\x00" * (1 << 20)) + pickle.BINPUT + b"\x01"
    encode = op_global("_codecs", "encode") + pickle.BINPUT + b"\x02"
    one_copy = (pickle.BINGET + b"\x02" + pickle.MARK + pickle.BINGET + b"\x01"
                + op_text("latin1") + pickle.TUPLE + pickle.REDUCE)
    _write_pickle(path, text + encode + one_copy * 1000)


@case("pickle", "a pickle with no STOP")
def pickle_without_stop(context, path):
    _write_member(path, object_npy(pickle.PROTO + b"\x02" + op_object_array([])))


@case("pickle", "BINUNICODE declaring 4 GiB of text in a few bytes")
def huge_text_length(context, path):
    _write_pickle(path, pickle.BINUNICODE + struct.pack("<I", 0xFFFFFFFF) + b"abc")


@case("pickle", "1 MiB of bytes after the pickle's STOP")
def trailing_data(context, path):
    valid = object_npy(whole_pickle(op_object_array(
        [op_float_array(a) for a in context.valid_arrays])))
    _write_member(path, valid + b"\0" * (1 << 20))


# Files that parse: the importer's value and architecture checks.
@case("values", "the released shapes, every value NaN")
def nan_weights(context, path):
    _write_member(path, numpy_object_npy([np.full_like(a, np.nan) for a in context.valid_arrays]))


@case("values", "float arrays of shapes that fit no ComDefend architecture")
def wrong_shapes(context, path):
    arrays = list(context.valid_arrays)
    arrays[4] = np.zeros((3, 3, 32, 48), np.float32)
    arrays[5] = np.zeros(48, np.float32)
    _write_member(path, numpy_object_npy(arrays))


@case("values", "17 of the 18 arrays")
def missing_array(context, path):
    _write_member(path, numpy_object_npy(context.valid_arrays[:-1]))


@case("values", "the decoder's arrays given as the encoder")
def decoder_as_encoder(context, path):
    config = get_config("paper")
    decoder = [np.zeros(s, np.float32) for s in reference.network_shapes(config, "decoder")]
    _write_member(path, numpy_object_npy(decoder))


# ----------------------------------------------------------------------------------- running
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def import_with_decoder(path: str, decoder_path: str) -> None:
    """The importer's whole read-and-check path, short of building the Keras model."""
    reference.read_reference_pair(path, decoder_path)


def _child(path: str, decoder_path: str, importer, memory_limit_mib: int) -> dict:
    faulthandler.disable()  # a crash is reported by its signal, not by a traceback dump
    start_kib = _status_kib("VmRSS")
    if memory_limit_mib:
        limit = (_status_kib("VmSize") + memory_limit_mib * 1024) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        importer(path, decoder_path)
        outcome, message = ACCEPTED, ""
    except reference.ReferenceWeightsError as error:
        outcome, message = REFUSED, str(error)
    except BaseException as error:  # noqa: B036 - every other ending is what we count
        outcome, message = OTHER_EXCEPTION, f"{type(error).__name__}: {error}"
    return {"outcome": outcome, "message": message, "start_rss_kib": start_kib,
            "peak_rss_kib": _status_kib("VmHWM")}


def check_file(path: str, decoder_path: str, *, timeout_s: float = 60.0,
               memory_limit_mib: int = 1024, importer=import_with_decoder) -> dict:
    """Imports ``path`` in a forked child and classifies how that ended.

    Returns a dict: ``outcome`` (refused / accepted / other exception / crashed / timed out),
    ``message`` (the exception's text, or the signal), ``peak_rss_mib`` (the child's
    high-water mark, from ``wait4``), ``growth_mib`` (how far it rose above the child's
    resident size at the start of the import) and ``seconds``.
    """
    read_end, write_end = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into the caller's code
        try:
            os.close(read_end)
            report = json.dumps(_child(path, decoder_path, importer, memory_limit_mib)).encode()
            view = memoryview(report)
            while view:
                view = view[os.write(write_end, view):]
        finally:
            os._exit(0)
    os.close(write_end)
    chunks, timed_out = [], False
    try:
        while True:
            left = timeout_s - (time.monotonic() - started)
            if left <= 0:
                timed_out = True
                os.kill(pid, signal.SIGKILL)
                break
            ready, _, _ = select.select([read_end], [], [], left)
            if ready:
                chunk = os.read(read_end, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(read_end)
        _, status, usage = os.wait4(pid, 0)
    seconds = time.monotonic() - started
    result = {"outcome": None, "message": "", "seconds": round(seconds, 3),
              "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "growth_mib": None}
    if timed_out:
        result.update(outcome=TIMED_OUT, message=f"no answer within {timeout_s:g} s")
    elif os.WIFSIGNALED(status):
        result.update(outcome=CRASHED,
                      message=f"killed by {signal.Signals(os.WTERMSIG(status)).name}")
    elif not chunks:
        result.update(outcome=CRASHED,
                      message=f"exited with status {os.waitstatus_to_exitcode(status)} and no "
                              f"report")
    else:
        report = json.loads(b"".join(chunks))
        result.update(outcome=report["outcome"], message=report["message"],
                      growth_mib=round((report["peak_rss_kib"] - report["start_rss_kib"]) / 1024,
                                       1))
    return result


def saved_npy(array: np.ndarray) -> bytes:
    """The bytes ``np.save`` writes (what ``np.savez_compressed`` puts in each member)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def valid_encoder_arrays(seed: int = 0) -> list[np.ndarray]:
    """Random arrays of the paper-width RGB encoder's shapes.

    Values are multiples of 1/256 in [-1/16, 1/16): valid weights that deflate quickly, so
    building the corpus stays fast.
    """
    rng = np.random.default_rng(seed)
    return [(rng.integers(-16, 16, shape) / 256).astype(np.float32)
            for shape in reference.network_shapes(get_config("paper"), "encoder")]


def build_corpus(folder: Path, bomb_mib: int, names=None) -> tuple[list[tuple[Case, Path]], str]:
    """Writes every case (or those in ``names``) into ``folder``.

    Returns ``[(case, path)]`` and the path of the valid decoder file the cases are paired
    with.
    """
    arrays = valid_encoder_arrays()
    context = Context(folder, bomb_mib, saved_npy(object_array(arrays)), arrays)
    decoder_path = folder / "valid_decoder.npy"
    decoder = [np.zeros(shape, np.float32)
               for shape in reference.network_shapes(get_config("paper"), "decoder")]
    _write_member(decoder_path, saved_npy(object_array(decoder)))
    selected = [c for c in CASES if names is None or c.name in names]
    unknown = set(names or ()) - {c.name for c in CASES}
    if unknown:
        raise ValueError(f"unknown case names: {sorted(unknown)}")
    written = []
    for item in selected:
        path = folder / f"{item.name}.npy"
        item.build(context, path)
        written.append((item, path))
    return written, str(decoder_path)


def run_corpus(folder: Path, *, bomb_mib: int = 1024, timeout_s: float = 60.0,
               memory_limit_mib: int = 1024, names=None) -> list[dict]:
    """Builds the corpus in ``folder`` and imports each file in a child process.

    Returns one dict per case: ``name``, ``layer``, ``description``, ``expect``, ``bytes``
    (the file's size, 0 for non-files), ``ok`` (the outcome is the expected one and no
    sentinel was created) and ``check_file``'s fields.
    """
    written, decoder_path = build_corpus(folder, bomb_mib, names)
    rows = []
    for item, path in written:
        result = check_file(str(path), decoder_path, timeout_s=timeout_s,
                            memory_limit_mib=memory_limit_mib)
        sentinel = Path(f"{folder / item.name}.code_ran")
        if sentinel.exists():
            result.update(outcome=CODE_RAN, message=f"the payload created {sentinel}")
        size = path.stat().st_size if path.is_file() and not path.is_symlink() else 0
        rows.append({"name": item.name, "layer": item.layer, "description": item.description,
                     "expect": item.expect, "bytes": size,
                     "ok": result["outcome"] == item.expect, **result})
    return rows


def format_table(rows: list[dict], folder: Path) -> str:
    """A plain-text table of ``run_corpus`` rows, then totals."""
    lines = [f"{'case':<30} {'layer':<7} {'bytes':>10} {'outcome':<15} {'peak MiB':>8} "
             f"{'grew MiB':>8}  message"]
    for row in rows:
        message = row["message"].replace(str(folder) + os.sep, "")
        if len(message) > 110:
            message = message[:107] + "..."
        growth = "-" if row["growth_mib"] is None else f"{row['growth_mib']:.1f}"
        flag = "" if row["ok"] else "  <-- expected " + row["expect"]
        lines.append(f"{row['name']:<30} {row['layer']:<7} {row['bytes']:>10} "
                     f"{row['outcome']:<15} {row['peak_rss_mib']:>8.1f} {growth:>8}  "
                     f"{message}{flag}")
    totals = summarize(rows)
    lines.append("")
    lines.append(f"hostile files: {totals['hostile']}, refused with ReferenceWeightsError: "
                 f"{totals['refused']}, crashed: {totals['crashed']}, other exception: "
                 f"{totals['other_exception']}, accepted: {totals['accepted']}, timed out: "
                 f"{totals['timed_out']}, code ran: {totals['code_ran']}")
    lines.append(f"controls accepted: {totals['controls_accepted']} of {totals['controls']}")
    lines.append(f"child peak RSS: max {totals['max_peak_rss_mib']:.1f} MiB; largest rise "
                 f"during one import: {totals['max_growth_mib']:.1f} MiB "
                 f"({totals['max_growth_case']})")
    return "\n".join(lines)


def summarize(rows: list[dict]) -> dict:
    hostile = [r for r in rows if r["expect"] == REFUSED]
    controls = [r for r in rows if r["expect"] == ACCEPTED]
    grown = [r for r in rows if r["growth_mib"] is not None]
    largest = max(grown, key=lambda r: r["growth_mib"]) if grown else None
    count = lambda outcome: sum(r["outcome"] == outcome for r in hostile)  # noqa: E731
    return {"hostile": len(hostile), "refused": count(REFUSED), "crashed": count(CRASHED),
            "other_exception": count(OTHER_EXCEPTION), "accepted": count(ACCEPTED),
            "timed_out": count(TIMED_OUT), "code_ran": count(CODE_RAN),
            "controls": len(controls),
            "controls_accepted": sum(r["outcome"] == ACCEPTED for r in controls),
            "max_peak_rss_mib": max((r["peak_rss_mib"] for r in rows), default=0.0),
            "max_growth_mib": largest["growth_mib"] if largest else 0.0,
            "max_growth_case": largest["name"] if largest else None,
            "all_ok": all(r["ok"] for r in rows)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", help="write the rows and totals as JSON to this file")
    parser.add_argument("--keep", help="build the corpus in this (new or empty) folder and "
                        "keep it; default: a temporary folder, removed afterwards")
    parser.add_argument("--bomb-mib", type=int, default=1024,
                        help="how many MiB each compression bomb inflates to (default 1024; "
                        "the bzip2 one takes about 10 s per GiB to build)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds one import may take before it counts as a hang")
    parser.add_argument("--memory-limit-mib", type=int, default=1024,
                        help="how far a child's address space may grow (RLIMIT_AS) while "
                        "importing; 0 for no limit")
    parser.add_argument("--case", action="append", dest="cases",
                        help="run only this case (repeatable); --list shows the names")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    if args.list:
        for item in CASES:
            print(f"{item.name:<30} {item.layer:<7} {item.description}")
        return 0
    with tempfile.TemporaryDirectory(prefix="hostile_weights_") as scratch:
        folder = Path(args.keep or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        rows = run_corpus(folder, bomb_mib=args.bomb_mib, timeout_s=args.timeout,
                          memory_limit_mib=args.memory_limit_mib, names=args.cases)
        print(format_table(rows, folder))
        print(f"{len(rows)} cases in {time.monotonic() - started:.1f} s (python "
              f"{platform.python_version()}, numpy {np.__version__}, limits: file "
              f"{reference.MAX_FILE_BYTES} B, member {reference.MAX_MEMBER_BYTES} B)")
        totals = summarize(rows)
        if args.output:
            with open(args.output, "w") as handle:
                json.dump({"totals": totals, "cases": rows, "bomb_mib": args.bomb_mib,
                           "python": platform.python_version(), "numpy": np.__version__,
                           "limits": {"max_file_bytes": reference.MAX_FILE_BYTES,
                                      "max_member_bytes": reference.MAX_MEMBER_BYTES}},
                          handle, indent=1)
    return 0 if totals["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
