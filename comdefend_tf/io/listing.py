"""The one lister of image files: a file, a folder or a glob -> sorted paths and refusals.

``list_images(pattern, max_files)`` -> ``ImageListing(paths, refused)``: ``paths`` sorted,
``refused`` sorted ``(path, reason)`` pairs (a symbolic link leading outside the input tree, a
dangling link, a non-regular file). Folders stream through ``os.scandir`` and count against
``max_files`` as they come (``TooManyFilesError`` past it); ``**`` never follows links to
folders, so link loops end. Nothing matching raises ``FileNotFoundError``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import os
import stat

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DEFAULT_MAX_FILES = 1_000_000  # the purify command's --max_files


class TooManyFilesError(ValueError):
    """An input pattern that matches more files than the cap allows."""


@dataclasses.dataclass
class ImageListing:
    """The files an input pattern names: ``paths`` to read, sorted, and ``refused`` (path,
    reason) pairs for files that must not be read (links leading outside the input tree,
    dangling links, non-regular files)."""

    paths: list[str]
    refused: list[tuple[str, str]]


def list_images(pattern: str, max_files: int = DEFAULT_MAX_FILES) -> ImageListing:
    """The image files named by ``pattern``.

    Args:
      pattern: one file (any extension: its content decides; followed if it is a link), a
        folder (its ``.png``, ``.jpg`` and ``.jpeg`` files, any case, not recursive) or a glob
        (``photos/*.jpg``; ``**`` recurses without following links to folders).
      max_files: refuse patterns matching more files than this (counted as they stream in from
        ``os.scandir``, so a huge folder is never listed whole first).

    Symbolic links among the matches are read only when they lead to a regular file inside the
    input tree (the folder, or the glob's leading folder); others are refused with a reason.

    Raises:
      FileNotFoundError: nothing matches (the message repeats the pattern).
      TooManyFilesError: more than ``max_files`` matches.
    """
    if os.path.isfile(pattern):
        return ImageListing([pattern], [])
    if os.path.isdir(pattern):
        root, candidates = pattern, _folder_images(pattern)
        empty = f"folder {pattern!r} holds no {'/'.join(IMAGE_EXTENSIONS)} files"
    else:
        root, candidates = _glob_root(pattern)[0] or ".", _walk_glob(pattern)
        empty = (f"no file matches {pattern!r} (expected an image file, a folder or a glob "
                 f"such as 'photos/*.png')")
    root_real = os.path.realpath(root)
    paths, refused = [], []
    for path in candidates:
        reason = refusal(path, root_real)
        if reason == "folder":
            continue
        if reason:
            refused.append((path, reason))
        else:
            paths.append(path)
        if len(paths) + len(refused) > max_files:
            raise TooManyFilesError(f"{pattern!r} matches more than {max_files:,} files; split "
                                    f"the input or raise the limit (--max_files)")
    if not paths and not refused:
        raise FileNotFoundError(empty)
    return ImageListing(sorted(paths), sorted(refused))


def _folder_images(folder: str):
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.lower().endswith(IMAGE_EXTENSIONS):
                yield entry.path


def _glob_root(pattern: str) -> tuple[str, list[str]]:
    """(the glob's leading folder without wildcards, as written or '' for none; the remaining
    path segments)."""
    parts = pattern.split(os.sep)
    fixed = 0
    while fixed < len(parts) - 1 and not glob.has_magic(parts[fixed]):
        fixed += 1
    root = os.sep.join(parts[:fixed]) or (os.sep if fixed else "")
    return root, [part for part in parts[fixed:] if part]


def _walk_glob(pattern: str):
    """Files matching a glob, as ``glob`` matches them (hidden names only by an explicit
    leading dot), streamed one folder entry at a time. A ``**`` never follows links to folders,
    so link loops end; other wildcard segments do (their depth is bounded by the pattern)."""
    root, segments = _glob_root(pattern)
    seen = set()
    for path in _match_segments(root, segments):
        if path not in seen:  # 'a/**/**/b' reaches a file along several routes
            seen.add(path)
            yield path


def _match_segments(folder: str, segments: list[str]):
    if not segments:
        return
    head, rest = segments[0], segments[1:]
    try:
        listing = os.scandir(folder or ".")
    except OSError:
        return
    subfolders = []
    with listing:
        for entry in listing:
            hidden = entry.name.startswith(".")
            path = os.path.join(folder, entry.name)
            try:
                if head == "**":
                    if not hidden and entry.is_dir(follow_symlinks=False):
                        subfolders.append(path)
                    if not hidden and not rest:  # a final '**' matches everything below
                        yield path
                elif (not hidden or head.startswith(".")) and fnmatch.fnmatchcase(entry.name,
                                                                                    head):
                    if not rest:
                        yield path
                    elif entry.is_dir():
                        subfolders.append(path)
            except OSError:
                continue
    if head == "**":
        if rest:
            yield from _match_segments(folder, rest)
        for subfolder in subfolders:
            yield from _match_segments(subfolder, segments)
    else:
        for subfolder in subfolders:
            yield from _match_segments(subfolder, rest)


def refusal(path: str, root_real: str) -> str | None:
    """Why ``path`` must not be read, given the real path of its input tree: None to read it,
    "folder" for a folder (silently not a file), else the reason in words."""
    try:
        target = os.path.realpath(path)
        if os.path.islink(path) and not os.path.exists(target):
            return "dangling symbolic link"
        if os.path.commonpath([target, root_real]) != root_real:
            return (f"leads outside the input folder {root_real!r} through a symbolic link "
                    f"(to {target!r})")
        info = os.stat(path)
    except (OSError, ValueError) as error:
        return f"cannot inspect: {error}"
    if stat.S_ISDIR(info.st_mode):
        return "folder"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    return None
