"""The ``w.npy`` member of a weight file: a ``.npy`` header and a pickle, read by a purpose-built
interpreter that runs no code.

``object_array_entries(payload, source) -> list[np.ndarray]`` accepts a ``.npy`` (version 1.0 or
2.0) header declaring a 1-D object array of 1 to ``MAX_ARRAYS`` entries, followed by a pickle
(protocol 2 to 4) of exactly that array, and returns its entries: float16/32/64 arrays of at
most ``MAX_ARRAY_DIMENSIONS`` dimensions, none empty, each listed once. ``_WeightPickle`` knows
only the opcodes numpy writes for such an array and only the globals in ``ALLOWED_GLOBALS``,
none of which it calls with the file's arguments; every array state is checked before numpy
builds the array. Its work is bounded (``MAX_PICKLE_OPERATIONS``, ``MAX_PICKLE_STACK``,
``MAX_PICKLE_MEMO``, new bytes up to twice the pickle's size). Anything else raises
``ReferenceWeightsError`` naming the file, the pickle byte and the problem
(docs/internals/weights.md lists what is refused).
"""

from __future__ import annotations

import io
import pickle  # opcode constants only: nothing here calls pickle.load
import pickletools
import struct

import numpy as np

from comdefend_tf.weights.architectures import ARRAYS_PER_NETWORK
from comdefend_tf.weights.errors import ReferenceWeightsError
from comdefend_tf.weights.safe_zip import READ_CHUNK_BYTES, WEIGHTS_MEMBER

# Limits on the work a member's pickle may cost (a released file runs about 850 operations).
MAX_ARRAYS = 64  # entries of the object array (a released file has 18)
MAX_ARRAY_DIMENSIONS = 4
MAX_NPY_HEADER_BYTES = 10_000  # numpy's own default limit
MAX_PICKLE_OPERATIONS = 100_000
MAX_PICKLE_STACK = 1024
MAX_PICKLE_MEMO = 4096
MAX_GLOBAL_NAME_BYTES = 256


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
        if any(size == 0 for size in shape):
            # No released array is empty, and numpy cannot always build or convert an empty
            # array whose other dimensions are huge (shape (0, 2**31-1, 2**31-1) is "too big").
            self._fail(f"array shape {shape} has a zero dimension: an empty array, which a "
                       f"weight file never holds")
        count = 1
        for size in shape:
            count *= size
        if dtype.dtype == np.dtype(object):
            if len(shape) != 1 or fortran_order or type(data) is not list or len(data) != count:
                self._fail(f"object array of shape {shape} with data {_describe(data)}; it must "
                           f"be 1-D, hold a list of exactly its length, in C order")
            entries = np.empty(count, dtype=object)
            first_listing: dict[int, int] = {}
            for index, entry in enumerate(data):
                self._check_entry(entry, index)
                earlier = first_listing.setdefault(id(entry), index)
                if earlier != index:
                    # A memo reference lists one array again at no cost in the file, but each
                    # listing would be converted into its own float32 copy.
                    self._fail(f"entry {index} is entry {earlier} listed again (a memo "
                               f"reference): a weight file lists each array once; repeated "
                               f"listings would multiply memory")
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
        try:
            array = _numpy_reconstruct(np.ndarray, (0,), b"b")
            array.__setstate__((1, shape, dtype.dtype, fortran_order, data))
        except (ValueError, MemoryError) as error:  # not expected after the checks above
            self._fail(f"numpy cannot build a {dtype.dtype} array of shape {shape} "
                       f"({type(error).__name__})")
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


def object_array_entries(payload: bytes, source: str) -> list[np.ndarray]:
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
