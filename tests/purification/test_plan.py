"""One input planner for the purify command and the Beam pipeline: the same files listed, the
same links and loops refused by name, the same cap; and the refusal words and lines both use."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from comdefend_tf.io import images as image_io
from comdefend_tf.purification import plan, refusals


def _png(path, value=0, size=(6, 5)):
    Image.fromarray(np.full(size, value, np.uint8)).save(path)


@pytest.fixture()
def hostile_tree(tmp_path):
    """``root/<class>/`` folders with real PNGs, a link to a PNG outside ``root``, a link to
    itself (a loop) and a folder link back to ``root`` (a ``**`` loop)."""
    outside = tmp_path / "secret"
    outside.mkdir()
    _png(outside / "secret.png", 200)
    root = tmp_path / "root"
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        _png(root / name / "a.png", 10)
        _png(root / name / "b.png", 20)
    os.symlink(outside / "secret.png", root / "cats" / "outside.png")
    os.symlink("loop.png", root / "dogs" / "loop.png")
    os.symlink(root, root / "dogs" / "again")
    return root


def _keys(input_plan):
    return sorted(key for key, _, _ in input_plan.files)


def test_class_folders_refuse_links_outside_and_loops(hostile_tree):
    input_plan = plan.plan_inputs(str(hostile_tree))
    assert input_plan.class_names == ("cats", "dogs")
    assert _keys(input_plan) == [os.path.join(c, n) for c in ("cats", "dogs")
                                 for n in ("a.png", "b.png")]
    assert {label for _, _, label in input_plan.files} == {0, 1}
    refused = dict(input_plan.refused)
    assert sorted(refused) == [os.path.join("cats", "outside.png"),
                               os.path.join("dogs", "loop.png")]
    assert "outside the input folder" in refused[os.path.join("cats", "outside.png")]
    assert "secret" not in "".join(path for _, path, _ in input_plan.files)


def test_recursive_glob_does_not_follow_a_folder_loop(hostile_tree):
    input_plan = plan.plan_inputs(os.path.join(str(hostile_tree), "**", "*.png"))
    # Through dogs/again -> root, Python's glob would list every file again at every depth.
    assert _keys(input_plan) == [os.path.join(c, n) for c in ("cats", "dogs")
                                 for n in ("a.png", "b.png")]
    assert sorted(key for key, _ in input_plan.refused) == [
        os.path.join("cats", "outside.png"), os.path.join("dogs", "loop.png")]


def test_the_command_and_the_pipeline_list_the_same_files(hostile_tree):
    pattern = os.path.join(str(hostile_tree), "*", "*.png")
    listing = plan.list_files(pattern)
    input_plan = plan.plan_inputs(pattern)
    assert [path for _, path, _ in sorted(input_plan.files, key=lambda t: t[1])] == \
        listing.paths
    assert [(os.path.join(str(hostile_tree), key), detail)
            for key, detail in input_plan.refused] == listing.refused


def test_max_files_stops_both_before_any_work(hostile_tree):
    pattern = os.path.join(str(hostile_tree), "*", "*.png")
    with pytest.raises(plan.InputPlanError, match="more than 3 files"):
        plan.list_files(pattern, max_files=3)
    with pytest.raises(plan.InputPlanError, match="more than 3 files"):
        plan.plan_inputs(pattern, max_files=3)
    with pytest.raises(plan.InputPlanError, match="more than 3 files"):
        plan.plan_inputs(str(hostile_tree), max_files=3)
    assert len(plan.plan_inputs(str(hostile_tree), max_files=6).files) == 4


def test_nothing_to_read_is_an_input_plan_error(tmp_path):
    with pytest.raises(plan.InputPlanError, match="matches"):
        plan.plan_inputs(str(tmp_path / "none" / "*.png"))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(plan.InputPlanError, match="matches"):
        plan.plan_inputs(str(tmp_path / "*"))
    with pytest.raises(plan.InputPlanError, match="no TFRecord file"):
        plan.plan_inputs(f"{plan.TFRECORD_PREFIX}{tmp_path}/*.tfrecord")
    with pytest.raises(plan.InputPlanError, match="no file matches"):
        plan.list_files(str(tmp_path / "none" / "*.png"))


def test_tfrecord_globs_use_the_same_listing(tmp_path):
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "a.tfrecord").write_bytes(b"")
    (tmp_path / "elsewhere.tfrecord").write_bytes(b"")
    os.symlink(tmp_path / "elsewhere.tfrecord", tmp_path / "records" / "b.tfrecord")
    input_plan = plan.plan_inputs(f"{plan.TFRECORD_PREFIX}{tmp_path}/records/*.tfrecord")
    assert input_plan.files == (str(tmp_path / "records" / "a.tfrecord"),)
    assert [key for key, _ in input_plan.refused] == ["b.tfrecord"]
    with pytest.raises(plan.InputPlanError, match="more than 1 files"):
        plan.plan_inputs(f"{plan.TFRECORD_PREFIX}{tmp_path}/**/*.tfrecord", max_files=1)


# ------------------------------------------------------------------------------ refusals
def test_reason_words_follow_the_reader_errors():
    assert refusals.reason_of(image_io.ImageTooLargeError("x")) == refusals.TOO_LARGE
    assert refusals.reason_of(image_io.UnsupportedFormatError("x")) == refusals.UNREADABLE
    assert refusals.reason_of(FileNotFoundError("x")) == refusals.UNREADABLE
    assert list(refusals.REASONS) == ["unreadable", "too_large", "wrong_channels",
                                      "unsafe_file", "model_refused", "cannot_write"]


def test_refusal_lines_quote_names_and_drop_the_repeated_name():
    name = "evil\n\x1b[31m.png"
    error = image_io.ImageReadError(f"{name!r}: corrupt PNG data")
    detail = refusals.detail_of(error, name)
    assert detail == "corrupt PNG data"
    line = refusals.refused_line(name, detail)
    assert line == r"refused 'evil\n\x1b[31m.png': corrupt PNG data" and "\n" not in line
    assert refusals.detail_of("no name here", name) == "no name here"
    assert refusals.error_line("no inputs") == "error: no inputs"
    entry = refusals.Refusal(name, refusals.UNSAFE_FILE, "dangling symbolic link")
    assert json.loads(entry.to_json()) == {"key": name, "reason": "unsafe_file",
                                           "detail": "dangling symbolic link"}
    assert refusals.Refusal.from_json(entry.to_json()) == entry


# ------------------------------------------------------------------- the command's outputs
def test_an_output_folder_that_is_not_a_folder_is_refused_by_the_plan(tmp_path):
    from tests.fixtures import hostile_files

    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    _png(image)
    for situation, make in hostile_files.OUTPUT_SITUATIONS.items():
        root = tmp_path / situation.replace(" ", "_")
        root.mkdir()
        output_dir = make(str(root))
        with pytest.raises(plan.OutputPlanError, match="not a folder") as refused:
            plan.plan_outputs([str(image)], output_dir, overwrite=True)
        assert repr(output_dir) in str(refused.value), situation
    # A folder, an existing one, or one to be created below folders: accepted.
    assert plan.plan_outputs([str(image)], str(tmp_path / "new" / "deeper"))
    (tmp_path / "real_out").mkdir()
    os.symlink(tmp_path / "real_out", tmp_path / "out_link")
    assert plan.plan_outputs([str(image)], str(tmp_path / "out_link"))
