"""comdefend_tf.io.bounded: a regular file read once, never past its cap, never blocking."""

import os
import threading

import pytest

from comdefend_tf.io import bounded


def test_reads_the_whole_file_at_and_under_the_cap(tmp_path):
    path = tmp_path / "a.bin"
    data = os.urandom(200_000)
    path.write_bytes(data)
    assert bounded.read_regular_file(str(path), len(data)) == data
    assert bounded.read_regular_file(str(path), 10**9) == data


def test_a_file_over_the_cap_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * 1001)
    with pytest.raises(bounded.FileTooLargeError) as caught:
        bounded.read_regular_file(str(path), 1000)
    assert caught.value.size == 1001 and not caught.value.grew


def test_a_file_that_grows_while_read_is_refused_one_byte_past_the_cap(tmp_path, monkeypatch):
    path = tmp_path / "growing.bin"
    path.write_bytes(b"x" * 10)
    real_fstat = os.fstat

    def stale_fstat(descriptor):  # the size seen before the file grew
        info = real_fstat(descriptor)
        return os.stat_result((info.st_mode, *info[1:6], 5, *info[7:]))

    monkeypatch.setattr(bounded.os, "fstat", stale_fstat)
    with pytest.raises(bounded.FileTooLargeError) as caught:
        bounded.read_regular_file(str(path), 8)
    assert caught.value.grew and caught.value.size == 9


def test_a_fifo_and_a_folder_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(
        pytest.raises(bounded.NotRegularFileError, bounded.read_regular_file, str(fifo), 100)))
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive() and outcome, "opening a FIFO blocked"
    with pytest.raises(bounded.NotRegularFileError):
        bounded.read_regular_file(str(tmp_path), 100)


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        bounded.read_regular_file(str(tmp_path / "absent"), 100)
