"""How purification names what it refuses: one reason word per kind of refusal, one line format.

A refused input gets a reason word from ``REASONS`` (``reason_of`` maps an ``io.images`` error
to it) and a detail sentence without the input's name (``detail_of``). The purify command prints
``refused_line`` (``refused 'PATH': DETAIL``); the Beam pipeline writes a ``Refusal`` as one
dead-letter JSON line and counts it as ``refused_<reason>``. A request that cannot start is one
``error_line`` (``error: MESSAGE``). Names are quoted as Python's ``repr`` quotes them, so a
hostile file name cannot forge a line or a terminal escape.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

from comdefend_tf.io import images as image_io

UNREADABLE = "unreadable"
TOO_LARGE = "too_large"
WRONG_CHANNELS = "wrong_channels"
UNSAFE_FILE = "unsafe_file"
MODEL_REFUSED = "model_refused"
CANNOT_WRITE = "cannot_write"

# What each reason covers (the order is the order of the manifest and of printed counts).
REASONS = {
    UNREADABLE: "missing, empty, not PNG or JPEG (whatever its name), corrupt or truncated, "
                "JPEG with other than 1 or 3 colour components, or unreadable; a damaged "
                "TFRecord record (checksum, truncation) and what follows it in its file",
    TOO_LARGE: "more bytes than the byte limit, or a header declaring more pixels than the "
               "pixel limit or than an exported model's pixels per request (checked before "
               "reading or decoding)",
    WRONG_CHANNELS: "the image's own colour kind (grey: 1 channel, colour: 3) is not the "
                    "model's (the Beam pipeline only; the purify command converts)",
    UNSAFE_FILE: "refused by the input listing before it is opened: a link leading outside "
                 "the input folder, a dangling or looping link, a FIFO, device or socket, "
                 "or a file that cannot be inspected, or a name that is not valid UTF-8",
    MODEL_REFUSED: "the model refused the image (an exported model's InvalidArgumentError, "
                   "asked with the image alone; the Beam pipeline only)",
    CANNOT_WRITE: "an output of the image could not be written (the file system refused "
                  "it: a name or path too long, a file already there, no space)",
}


class Refusal(NamedTuple):
    """One refused input: its ``key`` (name or path), a word of ``REASONS``, a detail."""

    key: str
    reason: str
    detail: str

    def to_json(self) -> str:
        """The dead-letter line: ``{"detail", "key", "reason"}``, keys sorted."""
        return json.dumps({"key": self.key, "reason": self.reason, "detail": self.detail},
                          sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> "Refusal":
        entry = json.loads(line)
        return cls(entry["key"], entry["reason"], entry["detail"])


def escaped_name(name: str) -> str:
    """``name`` as valid UTF-8 text: a file name's bytes that are not UTF-8 (Python holds them
    as surrogate escapes, which no UTF-8 writer accepts) shown as ``\\xNN``; other names
    unchanged."""
    try:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name holds: not from the file system
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def reason_of(error: BaseException) -> str:
    """The reason word of an ``io.images`` read error (``TOO_LARGE`` or ``UNREADABLE``)."""
    return TOO_LARGE if isinstance(error, image_io.ImageTooLargeError) else UNREADABLE


def detail_of(error, name: str) -> str:
    """``str(error)`` without the leading quoted ``name`` that ``io.images`` messages start
    with (the refusal line or entry already names the input)."""
    text = str(error)
    return text.removeprefix(repr(name)).lstrip(": ") or text


def refused_line(name: str, detail: str) -> str:
    """``refused 'NAME': DETAIL``."""
    return f"refused {name!r}: {detail}"


def error_line(message) -> str:
    """``error: MESSAGE``: a request that could not start (nothing was written)."""
    return f"error: {message}"
