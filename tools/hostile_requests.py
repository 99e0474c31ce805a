"""Command wrapper: Runs a corpus of malformed serving requests against an exported ComDefend SavedModel.

The corpus and its checks live in tests/fixtures/hostile_requests.py (the test suite uses them too);
``python tools/hostile_requests.py --help`` lists the options.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.fixtures.hostile_requests import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
