"""Command wrapper: runs the corpus of hostile image files against the purify command's reader.

The corpus and its checks live in tests/fixtures/hostile_files.py (the test suite uses them
too). Prints a JSON summary; exits 1 when any case is not refused by name.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.fixtures.hostile_files import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
