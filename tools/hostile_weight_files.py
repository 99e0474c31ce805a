"""Command wrapper: Builds a corpus of hostile weight files and checks that the importer refuses every one.

The corpus and its checks live in tests/fixtures/hostile_weight_files.py (the test suite uses them too);
``python tools/hostile_weight_files.py --help`` lists the options.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.fixtures.hostile_weight_files import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
