"""The ``w.npy`` pickle interpreter: arrays that are empty, and arrays listed more than once.

Payloads are assembled by tests/fixtures/hostile_weight_files.py's pickle builders (written from
the pickle format, independently of the reader) or by numpy's own pickler.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from comdefend_tf.weights import pickle_reader
from comdefend_tf.weights.errors import ReferenceWeightsError
from tests.fixtures import hostile_weight_files as hostile

HUGE = 2 ** 31 - 1  # the largest dimension BININT can carry


def _payload(entries: list[bytes]) -> bytes:
    return hostile.object_npy(hostile.whole_pickle(hostile.op_object_array(entries)),
                              (len(entries),))


def _empty_entry(shape, code="f4") -> bytes:
    return hostile.op_empty_array() + hostile.op_array_state(
        shape, hostile.op_dtype(code), hostile.op_bytes(b""))


@pytest.mark.parametrize("shape,code", [
    ((0,), "f4"),
    ((0, HUGE), "f4"),
    ((HUGE, 0), "f2"),
    ((0, HUGE, HUGE), "f2"),  # numpy's own ValueError ("array is too big") before the fix
    ((0, HUGE, HUGE, HUGE), "f4"),
    ((HUGE, HUGE, HUGE, 0), "f8"),  # a MemoryError before the fix
    ((3, 3, 0, 4), "f4"),
])
def test_an_empty_array_is_refused_by_name(shape, code):
    with pytest.raises(ReferenceWeightsError, match=r"has a zero dimension") as error:
        pickle_reader.object_array_entries(_payload([_empty_entry(shape, code)]), "w.bin")
    assert str(shape) in str(error.value) and "w.bin: w.npy: pickle byte" in str(error.value)


def test_an_empty_entry_after_valid_ones_names_its_shape():
    valid = hostile.op_float_array(np.ones((3, 3, 1, 2), np.float32))
    with pytest.raises(ReferenceWeightsError, match=r"shape \(0, 2147483647\) has a zero"):
        pickle_reader.object_array_entries(_payload([valid, _empty_entry((0, HUGE))]), "f")


def test_one_array_listed_through_the_memo_is_refused():
    array = hostile.op_float_array(np.ones((3, 3, 1, 2), np.float32)) + pickle.BINPUT + b"\x01"
    listings = [array, pickle.BINGET + b"\x01", pickle.BINGET + b"\x01"]
    with pytest.raises(ReferenceWeightsError,
                       match=r"entry 1 is entry 0 listed again \(a memo reference\).*multiply "
                             r"memory"):
        pickle_reader.object_array_entries(_payload(listings), "f")


def test_numpy_pickling_one_array_object_twice_is_refused():
    """numpy's pickler writes a memo GET for a repeated object: refused as a repeat."""
    shared = np.ones(4, np.float16)
    entries = np.empty(3, dtype=object)
    entries[0], entries[1], entries[2] = np.zeros(2, np.float32), shared, shared
    payload = hostile.object_npy(pickle.dumps(entries, protocol=2), (3,))
    with pytest.raises(ReferenceWeightsError, match=r"entry 2 is entry 1 listed again"):
        pickle_reader.object_array_entries(payload, "f")


def test_equal_arrays_that_are_distinct_objects_are_accepted():
    """Only a repeated listing is refused, not equal contents (zero biases are common)."""
    zeros = [np.zeros(4, np.float32) for _ in range(3)]
    entries = pickle_reader.object_array_entries(hostile.numpy_object_npy(zeros), "f")
    assert len(entries) == 3 and len({id(e) for e in entries}) == 3
    for entry in entries:
        np.testing.assert_array_equal(entry, np.zeros(4, np.float32))
