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
from typing import NamedTuple

from comdefend_tf.io import images as image_io

UNREADABLE = "unreadable"
TOO_LARGE = "too_large"
WRONG_CHANNELS = "wrong_channels"
UNSAFE_FILE = "unsafe_file"

# What each reason covers (the order is the order of the manifest and of printed counts).
REASONS = {
    UNREADABLE: "missing, empty, not PNG or JPEG (whatever its name), corrupt or truncated, "
                "JPEG with other than 1 or 3 colour components, or unreadable",
    TOO_LARGE: "more bytes than the byte limit, or a header declaring more pixels than the "
               "pixel limit (checked before reading or decoding)",
    WRONG_CHANNELS: "the image's own colour kind (grey: 1 channel, colour: 3) is not the "
                    "model's (the Beam pipeline only; the purify command converts)",
    UNSAFE_FILE: "refused by the input listing before it is opened: a link leading outside "
                 "the input folder, a dangling or looping link, a FIFO, device or socket, "
                 "or a file that cannot be inspected",
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
