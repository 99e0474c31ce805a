"""The one bounded reader of a user's file: a regular file, read once, never past a byte cap.

The file is opened non-blocking (a FIFO named like an image or a weight file cannot hang the
open), its type and size are checked on the open descriptor (``fstat``: a path swapped before
the open cannot slip a device or FIFO in), and reading stops one byte past the cap, so a file
that grows after the check cannot make us read more. Callers turn the errors below into their
own refusals (``io.images``: ``ImageReadError``; ``weights.safe_zip``: ``ReferenceWeightsError``).
"""

from __future__ import annotations

import os
import stat

READ_CHUNK_BYTES = 64 * 1024  # reads after the first (which asks for the whole file + 1 byte)


class NotRegularFileError(ValueError):
    """The path is a directory, device, FIFO or socket."""


class FileTooLargeError(ValueError):
    """The file has, or grew to, more bytes than the cap. ``grew``: it passed the size check
    and then grew while it was read."""

    def __init__(self, size: int, grew: bool):
        super().__init__(f"{size} bytes" + (" (grew while read)" if grew else ""))
        self.size = size
        self.grew = grew


class FileReadError(Exception):
    """An ``OSError`` while reading a file that opened (``error`` holds it)."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


def read_regular_file(path: str, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path`` if it has at most ``max_bytes`` bytes.

    Raises:
      OSError: the open failed (``FileNotFoundError`` when there is no such file).
      NotRegularFileError: not a regular file.
      FileTooLargeError: more than ``max_bytes`` bytes, before or while reading.
      FileReadError: an I/O error while reading.
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
                         | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFileError(path)
        if info.st_size > max_bytes:
            raise FileTooLargeError(info.st_size, grew=False)
        # One request for the whole file (one buffer, no copies), then bounded ones to its end.
        pieces, total, request = [], 0, info.st_size + 1
        try:
            while total <= max_bytes:
                piece = os.read(descriptor, min(request, max_bytes + 1 - total))
                if not piece:
                    break
                pieces.append(piece)
                total += len(piece)
                request = READ_CHUNK_BYTES
        except OSError as error:
            raise FileReadError(error) from error
        if total > max_bytes:
            raise FileTooLargeError(total, grew=True)
        return b"".join(pieces)
    finally:
        os.close(descriptor)
