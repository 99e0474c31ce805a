"""Small file-writing helpers shared by the library: writes that never leave half a file."""

from __future__ import annotations

import json
import os


def write_json_atomic(path: str, payload) -> None:
    """Writes ``payload`` as indented, key-sorted JSON via a temporary file and a rename, so a
    crash leaves either the previous file or the complete new one. Numpy scalars become floats.
    """
    partial = path + ".partial"
    with open(partial, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=float)
        handle.write("\n")
    os.replace(partial, path)
