"""comdefend_tf.io.atomic: readers see the old file or the whole new one, never a part."""

import json
import os
import stat

import pytest

from comdefend_tf.io import atomic


def _leftovers(folder):
    return [name for name in os.listdir(folder) if name.startswith(atomic.PARTIAL_PREFIX)]


def test_json_is_indented_sorted_and_newline_terminated(tmp_path):
    path = str(tmp_path / "metrics.json")
    atomic.write_json_atomic(path, {"b": 1, "a": [1.5]})
    text = open(path).read()
    assert text == json.dumps({"a": [1.5], "b": 1}, indent=2, sort_keys=True) + "\n"
    assert _leftovers(tmp_path) == []


def test_replace_false_never_replaces_an_existing_file(tmp_path):
    path = tmp_path / "out.png"
    path.write_bytes(b"someone else's file")
    with pytest.raises(FileExistsError):
        atomic.write_bytes_atomic(str(path), b"ours", replace=False)
    assert path.read_bytes() == b"someone else's file"
    assert _leftovers(tmp_path) == []


def test_replace_true_replaces(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    atomic.write_bytes_atomic(str(path), b"new")
    assert path.read_bytes() == b"new"


def test_failure_inside_the_block_publishes_nothing(tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b"previous good model")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(str(path)) as partial:
            assert partial.endswith(".keras")
            with open(partial, "wb") as handle:
                handle.write(b"half a mod")
            raise RuntimeError("killed while saving")
    assert path.read_bytes() == b"previous good model"
    assert _leftovers(tmp_path) == []


def test_temporary_name_does_not_grow_with_the_target_name(tmp_path):
    name = "x" * 250 + ".png"  # 254 bytes: the file system's limit is 255
    atomic.write_bytes_atomic(str(tmp_path / name), b"pixels")
    assert (tmp_path / name).read_bytes() == b"pixels"


def test_a_link_at_the_target_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "out.txt"
    link.symlink_to(victim)
    atomic.write_text_atomic(str(link), "purified")
    assert victim.read_text() == "keep me"
    assert not link.is_symlink() and link.read_text() == "purified"


def test_published_file_is_readable_like_a_normal_file(tmp_path):
    old_mask = os.umask(0o022)
    try:
        atomic.write_bytes_atomic(str(tmp_path / "a.bin"), b"1")
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE(os.stat(tmp_path / "a.bin").st_mode) == 0o644
