"""The purify command against hostile files and output folders (tests/fixtures/hostile_files.py):
outputs never silently replaced, not even by a concurrent run; output folders that are files
refused with an ``error:`` line; long names written; truncated and work-bomb images refused by
name, fast and with bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from comdefend_tf import ComDefend, get_config, load_comdefend, save_comdefend
from comdefend_tf.io import images as image_io
from comdefend_tf.purification import files as purify_files
from comdefend_tf.purification import plan
from tests.conftest import REPO_ROOT, subprocess_env
from tests.fixtures import hostile_files


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_model")
    model = ComDefend(get_config("tiny"), seed=0)
    last = model.encoder.get_layer("comcnn_conv3")
    kernel, bias = last.get_weights()
    last.set_weights([kernel * 20, bias])  # so the output really depends on the input
    save_comdefend(model, str(folder), {"note": "tiny random model for tests"})
    return str(folder)


@pytest.fixture(scope="module")
def model(model_dir):
    return load_comdefend(model_dir)


def _inputs(folder, names, value):
    """PNGs of one flat grey ``value`` (so two runs' outputs are told apart by content)."""
    folder.mkdir()
    for name in names:
        Image.fromarray(np.full((12, 10, 3), value, np.uint8)).save(folder / name)
    return plan.list_files(str(folder)).paths


def _run_cli(*flags):
    return subprocess.Popen([sys.executable, "-m", "export.purify_images", *flags,
                             "--noprogress"], cwd=REPO_ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ----------------------------------------------------------------- outputs are never lost
def test_an_output_that_appears_after_planning_is_kept_and_named(tmp_path, model):
    paths = _inputs(tmp_path / "in", ["a.png", "b.png"], 40)
    out = tmp_path / "out"
    out.mkdir()
    pairs = plan.plan_outputs(paths, str(out))
    (out / "b.png").write_bytes(b"a third party's file")  # after the plan's check
    summary = purify_files.purify_files(model, pairs, progress=False)
    assert summary.written == [str(out / "a.png")]
    assert (out / "b.png").read_bytes() == b"a third party's file"
    [(path, reason)] = summary.failures
    assert path == paths[1] and purify_files.OUTPUT_APPEARED in reason
    assert "b.png" in reason and "1 refused" in summary.line()
    assert sorted(os.listdir(out)) == ["a.png", "b.png"]  # no temporary file left behind

    replaced = purify_files.purify_files(model, pairs, progress=False, overwrite=True)
    assert replaced.failures == [] and len(replaced.written) == 2
    assert np.asarray(Image.open(out / "b.png")).shape == (12, 10, 3)


def test_a_run_planned_beside_another_loses_every_shared_name_by_name(tmp_path, model):
    names = [f"img{i}.png" for i in range(4)]
    first = _inputs(tmp_path / "first", names, 30)
    second = _inputs(tmp_path / "second", names[1:] + ["own.png"], 220)
    out = tmp_path / "out"
    out.mkdir()
    # Both runs are planned while the folder is empty (the plan's check passes for both) ...
    first_pairs = plan.plan_outputs(first, str(out))
    second_pairs = plan.plan_outputs(second, str(out))
    # ... then the first publishes everything before the second does.
    assert len(purify_files.purify_files(model, first_pairs, progress=False).written) == 4
    before = {name: (out / name).read_bytes() for name in names}
    summary = purify_files.purify_files(model, second_pairs, progress=False)
    assert summary.written == [str(out / "own.png")]
    assert sorted(os.path.basename(path) for path, _ in summary.failures) == names[1:]
    assert all(purify_files.OUTPUT_APPEARED in reason for _, reason in summary.failures)
    assert {name: (out / name).read_bytes() for name in names} == before


def _claimed(result, names, folder):
    """The output names a finished run says it wrote: none when it could not start, all but
    the refused ones otherwise (refusal lines quote the input path)."""
    if result["rc"] == 1:
        return set()
    refused = {name for name in names if f"'{folder / name}'" in result["stderr"]}
    return set(names) - refused


def test_two_concurrent_runs_never_replace_each_others_outputs(tmp_path, model_dir, model):
    names = [f"img{i:02d}.png" for i in range(24)]
    dark, light = 20, 235
    _inputs(tmp_path / "dark", names, dark)
    _inputs(tmp_path / "light", names, light)
    out = tmp_path / "out"
    runs = {folder: _run_cli(f"--model_dir={model_dir}", f"--input={tmp_path / folder}",
                             f"--output_dir={out}") for folder in ("dark", "light")}
    results = {}
    for folder, process in runs.items():
        stdout, stderr = process.communicate(timeout=300)
        results[folder] = {"rc": process.returncode, "stdout": stdout, "stderr": stderr}
        assert process.returncode in (0, 1, 2), stderr
        assert "Traceback" not in stderr

    claims = {folder: _claimed(results[folder], names, tmp_path / folder) for folder in runs}
    assert claims["dark"].isdisjoint(claims["light"]), results  # nothing written twice
    assert claims["dark"] | claims["light"] == set(names)
    assert sorted(os.listdir(out)) == names
    expected = {value: image_io.to_uint8(purify_files.purify_array(
        model, np.full((12, 10, 3), value, np.float32) / np.float32(255)))
        for value in (dark, light)}
    for folder, value in (("dark", dark), ("light", light)):
        for name in claims[folder]:  # each file holds what the run that claims it wrote
            written = np.asarray(Image.open(out / name)).astype(int)
            assert np.abs(written - expected[value]).max() <= 1, (folder, name)
        result = results[folder]
        if result["rc"] == 2:  # the loser names every file it could not publish
            lines = [line for line in result["stderr"].splitlines() if "refused " in line]
            assert len(lines) == len(names) - len(claims[folder])
            assert all(purify_files.OUTPUT_APPEARED in line for line in lines)
        elif result["rc"] == 1:  # it lost the race at planning: nothing was written
            assert "--overwrite" in result["stderr"]


# ------------------------------------------------------------------ output folder checks
@pytest.mark.parametrize("situation", sorted(hostile_files.OUTPUT_SITUATIONS))
def test_an_output_folder_that_is_a_file_is_an_error_line(tmp_path, model_dir, situation):
    _inputs(tmp_path / "in", ["a.png"], 90)
    output_dir = hostile_files.OUTPUT_SITUATIONS[situation](str(tmp_path))
    before = sorted(os.listdir(tmp_path))
    process = _run_cli(f"--model_dir={model_dir}", f"--input={tmp_path / 'in'}",
                       f"--output_dir={output_dir}")
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert repr(output_dir) in line and "not a folder" in line
    assert sorted(os.listdir(tmp_path)) == before
    if situation != "a dangling link":
        assert (tmp_path / "out.txt").read_bytes() == b"not a folder"


# ------------------------------------------------------------------------------ long names
def test_a_250_character_name_is_purified_and_written(tmp_path, model):
    name = hostile_files.long_name(".png", 250)
    paths = _inputs(tmp_path / "in", [name], 120)
    out = tmp_path / "out"
    out.mkdir()
    summary = purify_files.purify_files(model, plan.plan_outputs(paths, str(out)),
                                        progress=False)
    assert summary.failures == [] and summary.written == [str(out / name)]
    assert len(os.path.basename(summary.written[0])) == 250
    assert np.asarray(Image.open(out / name)).shape == (12, 10, 3)
    assert os.listdir(out) == [name]


# ------------------------------------------------------------------------ hostile images
def test_hostile_images_are_refused_by_name_and_valid_ones_purified(tmp_path, model):
    folder = tmp_path / "in"
    folder.mkdir()
    cases = {case.name: case for case in hostile_files.FILE_CASES}
    for case in cases.values():
        hostile_files.write_case(str(folder), case)
    out = tmp_path / "out"
    out.mkdir()
    pairs = plan.plan_outputs(plan.list_files(str(folder)).paths, str(out))
    summary = purify_files.purify_files(model, pairs, progress=False, tile_above_pixels=0)
    refused = {os.path.basename(path): reason for path, reason in summary.failures}
    hostile = {name for name, case in cases.items() if case.keywords is not None}
    assert set(refused) == hostile
    for name in hostile:
        assert all(word.lower() in refused[name].lower() for word in cases[name].keywords), \
            (name, refused[name])
    assert sorted(os.listdir(out)) == sorted(os.path.splitext(name)[0] + ".png"
                                             for name in set(cases) - hostile)


def test_hostile_images_cost_little_time_and_memory_in_a_child():
    """Each refusal in under ``MAX_SECONDS`` with the child's peak RSS growing by less than
    ``MAX_RSS_GROWTH_MB`` (before: the 10000x10000 JPEG took 11.6 s and 2.1 GB)."""
    result = subprocess.run([sys.executable, "-m", "tests.fixtures.hostile_files"],
                            cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                            text=True, timeout=300)
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["failed"] == [], report
    assert report["crashed"] == 0
    rows = {row["name"]: row for row in report["rows"]}
    for case in hostile_files.FILE_CASES:
        row = rows[case.name]
        if case.keywords is None:
            assert row["outcome"] == "read", row
            continue
        assert row["outcome"] == "refused" and row["error"] == "ImageReadError", row
        assert row["seconds"] < hostile_files.MAX_SECONDS, row
        assert row["rss_growth_mb"] < hostile_files.MAX_RSS_GROWTH_MB, row
