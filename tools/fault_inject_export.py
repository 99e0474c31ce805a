"""Command wrapper: Kills the export binary at random moments and checks that no partial version is ever visible.

The corpus and its checks live in tests/fixtures/fault_inject_export.py (the test suite uses them too);
``python tools/fault_inject_export.py --help`` lists the options.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.fixtures.fault_inject_export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
