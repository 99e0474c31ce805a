"""The weight file itself: read once, bounded, hashed from the bytes that were parsed, and never
opened when it is not a regular file (a FIFO must not block the importer)."""

from __future__ import annotations

import hashlib
import io
import os
import time
import zipfile

import numpy as np
import pytest

from comdefend_tf.weights import safe_zip
from comdefend_tf.weights.errors import ReferenceWeightsError
from tests.fixtures import hostile_weight_files as hostile


def _weight_file(path, seed=0) -> bytes:
    arrays = [np.random.default_rng(seed).normal(size=(3, 3, 1, 2)).astype(np.float32)]
    path.write_bytes(hostile.zip_with_member(hostile.numpy_object_npy(arrays)))
    return path.read_bytes()


def test_member_and_sha256_come_from_one_read(tmp_path, monkeypatch):
    path = tmp_path / "enc.npy"
    content = _weight_file(path)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    member = safe_zip.read_weights_member(str(path))
    assert opened == [str(path)]  # the path is opened exactly once
    assert member.sha256 == hashlib.sha256(content).hexdigest()
    assert member.file_bytes == len(content)
    assert member.data.startswith(b"\x93NUMPY")


def test_a_file_replaced_after_the_read_changes_nothing_read(tmp_path, monkeypatch):
    """The hash and the member both come from the bytes read, whatever lies at the path now."""
    path, other = tmp_path / "enc.npy", tmp_path / "other.npy"
    content = _weight_file(path, seed=0)
    _weight_file(other, seed=1)
    real_read = safe_zip.read_whole_file

    def read_then_swap(name):
        data = real_read(name)
        os.replace(other, name)
        return data

    monkeypatch.setattr(safe_zip, "read_whole_file", read_then_swap)
    member = safe_zip.read_weights_member(str(path))
    assert member.sha256 == hashlib.sha256(content).hexdigest()
    assert member.sha256 != hashlib.sha256(path.read_bytes()).hexdigest()
    # The member parsed is the original's (zipfile only reads the test's own bytes here).
    assert member.data == zipfile.ZipFile(io.BytesIO(content)).read("w.npy")
    assert member.data != zipfile.ZipFile(path).read("w.npy")


def test_a_fifo_is_refused_promptly_without_blocking(tmp_path):
    path = tmp_path / "enc.npy"
    os.mkfifo(path)
    started = time.monotonic()
    with hostile.deadline(10), pytest.raises(ReferenceWeightsError, match="not a regular file"):
        safe_zip.read_weights_member(str(path))
    assert time.monotonic() - started < 5


def test_a_file_growing_past_the_cap_while_read_is_refused(tmp_path, monkeypatch):
    """The size is checked on the descriptor, then reading stops one byte past the cap."""
    path = tmp_path / "enc.npy"
    content = _weight_file(path)
    monkeypatch.setattr(safe_zip, "MAX_FILE_BYTES", len(content) + 100)
    real_fstat = os.fstat

    def fstat_then_grow(descriptor):
        info = real_fstat(descriptor)
        with open(path, "ab") as handle:  # another writer appends after the check
            handle.write(b"\0" * 4096)
        return info

    monkeypatch.setattr(os, "fstat", fstat_then_grow)
    with pytest.raises(ReferenceWeightsError, match=r"grew past the \d+ bytes"):
        safe_zip.read_weights_member(str(path))


def test_a_file_over_the_cap_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "enc.npy"
    content = _weight_file(path)
    monkeypatch.setattr(safe_zip, "MAX_FILE_BYTES", len(content) - 1)
    monkeypatch.setattr(os, "read", lambda *a: pytest.fail("read a file over the cap"))
    with pytest.raises(ReferenceWeightsError, match=rf"{len(content)} bytes, more than the"):
        safe_zip.read_weights_member(str(path))
