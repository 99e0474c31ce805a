"""The hostile weight-file corpus (tests/fixtures/hostile_weight_files.py) against the importer.

A subset read in this process (each refusal's message checked), the deflate-bomb allocation
bounds (tracemalloc), the child-process harness's classification of every ending, the memory a
child may gain on the amplification cases, and the whole corpus with each file imported in a
child process under an address-space cap (every hostile file refused with
``ReferenceWeightsError``, none crashing, the controls accepted).
"""

from __future__ import annotations

import os
import zlib

import pytest

from comdefend_tf.weights import importer as reference
from comdefend_tf.weights import safe_zip


# -------------------------------------------------------------------- hostile weight files
# A representative subset of tools/hostile_weight_files.py's corpus, read in this process so each
# refusal's message can be checked; test_hostile_corpus_* below runs the whole corpus, each
# file in a child process.
HOSTILE_SUBSET = {
    "ndarray_over_raw_pointers": "refusing to call numpy.ndarray",
    "stack_global_allowed_ndarray": "refusing to call numpy.ndarray",
    "obj_opcode": "opcode OBJ is not allowed",
    "newobj_ndarray": "opcode NEWOBJ is not allowed",
    "inst_opcode": "opcode INST is not allowed",
    "persid_opcode": "opcode PERSID is not allowed",
    "stack_global_exec": "refusing to unpickle the global builtins.exec",
    "numpy_frombuffer_global": "refusing to unpickle the global numpy.frombuffer",
    "object_state_raw_bytes": r"object array of shape \(18,\) with data",
    "state_set_twice": "a second state for an array",
    "dtype_state_tampered": "dtype 'f4' with state",
    "nested_object_array": "entry 0 is a nested object array",
    "int32_entries": "dtype 'i4' is not allowed",
    "huge_declared_float_shape": r"shape \(2147483647, 2147483647\) needs 18446744056529682436 b",
    "negative_shape": "negative dimension",
    "memo_undefined": "memo entry 200, which was never stored",
    "memo_self_cycle": "entry 0 is an array used before its state is set",
    "memo_reuse_bomb": "a memory bomb",
    "protocol5_next_buffer": "pickle protocol 5",
    "trailing_data": "1048576 bytes after the pickle's end",
    "header_huge_object_shape": r"shape \(1000000000000,\)",
    "header_code": "not a valid .npy member",
    "bzip2_bomb_small_declared": r"compression method 12 \(bzip2\)",
    "lzma_bomb_small_declared": r"compression method 14 \(LZMA\)",
    "deflate_bomb_small_declared": "more than the 4096 bytes it declares",
    "encrypted_member": "is encrypted",
    "unknown_method": r"compression method 77 \(unknown\)",
    "truncated_archive": "truncated or corrupt zip archive",
    "corrupt_crc": "CRC-32 mismatch",
    "many_members": "declares 10000 members",
    "duplicate_w_members": "holds exactly one",
    "zip_slip_name": r"no 'w' entry \(members: \['../../w.npy'\]\)",
    "local_name_mismatch": "the local header .* disagrees with the central directory",
    "zip64_end_record": "ZIP64",
    "fifo": "not a regular file",
    "symlink_to_dev_zero": "not a regular file",
    "plain_npy_with_code": "a plain .npy file, not an npz",
    "nan_weights": "entry 0 holds non-finite values",
    "zero_size_leading": r"shape \(0, 2147483647\) has a zero dimension",
    "zero_size_3d_float16": r"shape \(0, 2147483647, 2147483647\) has a zero dimension",
    "zero_size_4d_float64_last": r"2147483647, 0\) has a zero dimension",
    "memo_listed_many_times": r"entry 1 is entry 0 listed again \(a memo reference\)",
    "memo_listed_as_every_entry": "entry 1 is entry 0 listed again",
    "pickle_without_stop": "truncated: needs 1 bytes, 0 are left",
    "float16_shared_data_past_allowance": r"its 2 arrays hold 100663296 bytes as float32, "
                                          r"more than the \d+ a weight file may",
}
BOMB_MIB = 65  # just above MAX_MEMBER_BYTES (64 MiB), so the declared-at-cap bomb overflows it


@pytest.fixture(scope="module")
def hostile_subset(tmp_path_factory):
    from tests.fixtures import hostile_weight_files

    folder = tmp_path_factory.mktemp("hostile_subset")
    written, _ = hostile_weight_files.build_corpus(folder, BOMB_MIB, names=set(HOSTILE_SUBSET))
    return {item.name: (path, folder) for item, path in written}


@pytest.mark.parametrize("name", sorted(HOSTILE_SUBSET))
def test_hostile_file_is_refused_with_the_importers_error(hostile_subset, name):
    path, folder = hostile_subset[name]
    with pytest.raises(reference.ReferenceWeightsError, match=HOSTILE_SUBSET[name]) as error:
        reference.read_weight_arrays(str(path))
    assert str(path) in str(error.value)  # the message names the file
    assert not (folder / f"{name}.code_ran").exists()


def test_deflate_bomb_is_refused_without_allocating_it(tmp_path):
    """A 256 MiB bomb declaring 4 KiB: refused after 4097 bytes, allocating under 1 MiB."""
    import tracemalloc
    from tests.fixtures import hostile_weight_files as hostile

    data, crc = hostile.deflate_bomb(256)
    assert len(data) < 300_000
    # The bomb is real: the same data inflates far beyond its declaration.
    assert len(zlib.decompressobj(-zlib.MAX_WBITS).decompress(data, 8 << 20)) == 8 << 20
    path = tmp_path / "bomb.npy"
    path.write_bytes(hostile.raw_zip([hostile.RawMember(data, 4096, crc)]))
    tracemalloc.start()
    try:
        with pytest.raises(reference.ReferenceWeightsError,
                           match=r"more than the 4096 bytes it declares \(refused after 4097 "):
            reference.read_weight_arrays(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"reading the bomb allocated {peak} bytes"


def test_bomb_declaring_the_cap_stops_reading_at_the_cap(tmp_path, monkeypatch):
    """Declared sizes up to the cap are honoured, never exceeded: reading stops one byte past
    the cap, holding about the cap, however far the data would inflate."""
    import tracemalloc
    from tests.fixtures import hostile_weight_files as hostile

    cap = 2 << 20
    monkeypatch.setattr(safe_zip, "MAX_MEMBER_BYTES", cap)
    data, crc = hostile.deflate_bomb(64)
    path = tmp_path / "bomb.npy"
    path.write_bytes(hostile.raw_zip([hostile.RawMember(data, cap, crc)]))
    tracemalloc.start()
    try:
        with pytest.raises(reference.ReferenceWeightsError,
                           match=rf"more than the {cap} bytes it declares \(refused after "
                                 rf"{cap + 1} bytes"):
            reference.read_weight_arrays(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * cap, f"reading a {cap}-byte cap allocated {peak} bytes"
    path.write_bytes(hostile.raw_zip([hostile.RawMember(data, cap + 1, crc)]))
    with pytest.raises(reference.ReferenceWeightsError,
                       match=rf"would unpack to {cap + 1} bytes, more than the {cap}"):
        reference.read_weight_arrays(str(path))


@pytest.mark.parametrize("ending,outcome,detail", [
    ("segfault", "crashed", "SIGSEGV"),
    ("other", "other exception", "KeyError"),
    ("hang", "timed out", "no answer"),
    ("accept", "accepted", ""),
])
def test_child_process_check_classifies_every_ending(tmp_path, ending, outcome, detail):
    """The harness counts a crash instead of dying with it, and tells the endings apart."""
    import signal
    import time
    from tests.fixtures import hostile_weight_files as hostile

    def importer(path, decoder_path):
        if ending == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif ending == "other":
            raise KeyError("not the importer's error")
        elif ending == "hang":
            time.sleep(30)

    # Only the hanging child must run into the limit: the others get one a loaded machine
    # cannot reach (a 1 s limit for every child timed out twice under load 8 on 2 cores).
    result = hostile.check_file(str(tmp_path / "x.npy"), str(tmp_path / "y.npy"),
                                timeout_s=2.0 if ending == "hang" else 60.0,
                                importer=importer)
    assert result["outcome"] == outcome
    assert detail in result["message"]


@pytest.mark.parametrize("name", ["memo_listed_many_times",
                                  "float16_shared_data_past_allowance"])
def test_amplification_is_refused_with_memory_bounded(tmp_path, name):
    """Each listing or shared byte string used to become its own float32 copy (the first
    case: +1 GiB and a MemoryError under this cap); now the child grows by little more than
    the file's member."""
    from tests.fixtures import hostile_weight_files as hostile

    written, decoder = hostile.build_corpus(tmp_path, 1, names={name})
    result = hostile.check_file(str(written[0][1]), decoder, timeout_s=60,
                                memory_limit_mib=512)
    assert result["outcome"] == "refused", result["message"]
    assert result["growth_mib"] < 128, result


def test_hostile_corpus_every_file_refused_none_crashing(tmp_path):
    """tools/hostile_weight_files.py's whole corpus, each file imported in a child process.

    Run as the command, in a fresh interpreter: the children fork from it, so their memory
    figures do not depend on what this test worker has allocated before."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT, subprocess_env

    output = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, "tools/hostile_weight_files.py", "--bomb-mib", str(BOMB_MIB),
         "--keep", str(tmp_path / "corpus"), "--output", str(output)],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    results = json.loads(output.read_text())
    rows, totals = results["cases"], results["totals"]
    failures = [(r["name"], r["outcome"], r["message"][:200]) for r in rows if not r["ok"]]
    assert not failures
    assert totals["hostile"] >= 30 and totals["refused"] == totals["hostile"]
    assert totals["crashed"] == totals["code_ran"] == totals["accepted"] == 0
    assert totals["controls"] == totals["controls_accepted"] >= 2
    # A bomb may cost at most the member cap (plus the reader's own pieces), never its size.
    assert totals["max_growth_mib"] < safe_zip.MAX_MEMBER_BYTES / 2 ** 20 * 1.5
    assert not list((tmp_path / "corpus").glob("*.code_ran"))


def test_hostile_corpus_command_line_writes_json_and_exit_status(tmp_path):
    from tests.fixtures import hostile_weight_files as hostile

    output = tmp_path / "results.json"
    status = hostile.main(["--case", "ndarray_over_raw_pointers", "--case", "control_assembled",
                           "--keep", str(tmp_path / "corpus"), "--output", str(output)])
    assert status == 0
    import json
    results = json.loads(output.read_text())
    assert {row["name"]: row["outcome"] for row in results["cases"]} == {
        "ndarray_over_raw_pointers": "refused", "control_assembled": "accepted"}
    assert results["totals"]["all_ok"] is True
