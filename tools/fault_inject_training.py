"""Command wrapper: Fault injection for training: SIGKILL the training binary at random moments, restart it with

The corpus and its checks live in tests/fixtures/fault_inject_training.py (the test suite uses them too);
``python tools/fault_inject_training.py --help`` lists the options.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.fixtures.fault_inject_training import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
