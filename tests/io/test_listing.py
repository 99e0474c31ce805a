"""The one image lister: files, folders and globs, sorted; links out of the input tree,
dangling links and non-regular files refused by name; link loops and huge folders bounded."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from comdefend_tf.io import listing
from tests.io.encoded import save


def test_list_images_file_folder_glob(tmp_path):
    pixels = np.zeros((2, 2, 3), np.uint8)
    for name in ("b.png", "a.JPG", "c.jpeg"):
        save(tmp_path / name, pixels, format="PNG")
    (tmp_path / "readme.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    save(tmp_path / "sub" / "d.png", pixels)

    folder = listing.list_images(str(tmp_path))
    assert [os.path.basename(p) for p in folder.paths] == ["a.JPG", "b.png", "c.jpeg"]
    assert folder.refused == []
    assert listing.list_images(str(tmp_path / "b.png")).paths == [str(tmp_path / "b.png")]
    assert len(listing.list_images(str(tmp_path / "**" / "*.png")).paths) == 2
    with pytest.raises(FileNotFoundError, match="nothing"):
        listing.list_images(str(tmp_path / "nothing*.png"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        listing.list_images(str(tmp_path / "empty"))


def test_links_leaving_the_input_folder_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = save(outside / "secret.png", np.zeros((2, 2, 3), np.uint8))
    folder = tmp_path / "in"
    folder.mkdir()
    save(folder / "a.png", np.zeros((2, 2, 3), np.uint8))
    os.symlink(secret, folder / "escape.png")
    os.symlink(folder / "a.png", folder / "inside.png")
    os.symlink(tmp_path / "missing.png", folder / "dangling.png")
    os.symlink(outside, folder / "linked_dir")

    for pattern in (str(folder), str(folder / "*.png"), str(folder / "**" / "*.png")):
        found = listing.list_images(pattern)
        assert [os.path.basename(p) for p in found.paths] == ["a.png", "inside.png"], pattern
        reasons = dict((os.path.basename(p), r) for p, r in found.refused)
        assert set(reasons) == {"escape.png", "dangling.png"}, pattern
        assert "outside the input folder" in reasons["escape.png"]
        assert "dangling" in reasons["dangling.png"]
    # Through a linked folder in the middle of a glob: still outside.
    through = listing.list_images(str(folder / "*" / "*.png"))
    assert through.paths == [] and "outside" in through.refused[0][1]


def test_recursive_glob_does_not_follow_link_loops(tmp_path):
    folder = tmp_path / "tree"
    (folder / "sub").mkdir(parents=True)
    save(folder / "sub" / "a.png", np.zeros((2, 2, 3), np.uint8))
    os.symlink(folder, folder / "sub" / "loop")
    os.symlink(folder / "sub", folder / "sub" / "self")
    found = listing.list_images(str(folder / "**" / "*.png"))
    assert found.paths == [str(folder / "sub" / "a.png")]


def test_recursive_glob_matches_like_glob_on_a_plain_tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a.png", "b.jpg", ".hidden.png", "x/c.png", "x/y/d.png", "x/.h/e.png",
                 "z/f.PNG"):
        os.makedirs(os.path.dirname(name) or ".", exist_ok=True)
        save(name, np.zeros((2, 2, 3), np.uint8), format="PNG")
    for pattern in ("**/*.png", "x/**/*.png", "**/y/*.png", "**", "x/**", "**/.h*/*",
                    str(tmp_path / "**" / "*.png"), "*.png", "*/*.png", "x/*/?.png", ".*.png",
                    "[ab].*", "x/y/d.png", "*/y/*", "z/*.[Pp][Nn][Gg]"):
        expected = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        assert listing.list_images(pattern).paths == expected, pattern


def test_too_many_files_stop_the_listing(tmp_path):
    for index in range(5):
        save(tmp_path / f"{index}.png", np.zeros((2, 2, 3), np.uint8))
    assert len(listing.list_images(str(tmp_path), max_files=5).paths) == 5
    with pytest.raises(listing.TooManyFilesError, match="more than 4 files"):
        listing.list_images(str(tmp_path), max_files=4)
    with pytest.raises(listing.TooManyFilesError):
        listing.list_images(str(tmp_path / "**" / "*.png"), max_files=4)
