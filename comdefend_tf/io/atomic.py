"""Atomic file writes: a reader sees the previous file or the complete new one, never a part.

Every file the library writes (models, metrics, reports, figures, PNGs, exported bytes) goes
through :func:`atomic_path`: the content is written to a new temporary file in the target's
folder (created exclusively, so a planted file or link of that name is never written through),
flushed to disk, then published under the final name, replacing what was there
(``replace=True``) or failing with ``FileExistsError`` if anything was (``replace=False``: a
hard link, which never replaces). If ``path`` is a symbolic link the link is replaced, not its
target. Temporary names are ``.partial.<random><extension>`` whatever the target's length.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Iterator

PARTIAL_PREFIX = ".partial."
MAX_EXTENSION_CHARS = 16


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(partial: str, path: str, replace: bool = True) -> None:
    """Moves the finished temporary file ``partial`` to ``path`` (same folder)."""
    if replace:
        os.replace(partial, path)
        return
    os.link(partial, path)  # FileExistsError when anything stands at ``path``
    os.remove(partial)


@contextlib.contextmanager
def atomic_path(path: str, replace: bool = True) -> Iterator[str]:
    """Yields a temporary path beside ``path`` (same extension) to write to; on a normal exit
    the file is made world-readable (as ``open`` would, under the umask), synced and published
    at ``path``. On an exception the temporary file is removed and nothing is published."""
    folder, name = os.path.split(os.path.abspath(path))
    # The temporary name does not grow with ``name``: a target whose name is near the file
    # system's limit (255 bytes) must still be writable.
    extension = os.path.splitext(name)[1][:MAX_EXTENSION_CHARS]
    descriptor, partial = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix=extension, dir=folder)
    os.close(descriptor)
    try:
        yield partial
        os.chmod(partial, 0o644 & ~_umask())
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        publish(partial, path, replace)
    finally:
        if os.path.lexists(partial):
            os.remove(partial)


def write_bytes_atomic(path: str, data: bytes, replace: bool = True) -> None:
    """Writes ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, replace) as partial, open(partial, "wb") as handle:
        handle.write(data)


def write_text_atomic(path: str, text: str, replace: bool = True) -> str:
    """Writes ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    write_bytes_atomic(path, text.encode("utf-8"), replace)
    return path


def write_json_atomic(path: str, payload, replace: bool = True) -> None:
    """Writes ``payload`` as indented, key-sorted JSON with a final newline, atomically.
    Numpy scalars become floats."""
    text = json.dumps(payload, indent=2, sort_keys=True, default=float) + "\n"
    write_text_atomic(path, text, replace)
