"""Test-suite set-up: the `multiprocess` marker, and no leftovers in /dev/shm.

Tests that start ranks (tests.harness.run_ranks / run_torchrun) carry
`@pytest.mark.multiprocess` (or `pytestmark` for a whole module), so the pure-function tests
run alone in seconds:  python3 -m pytest -q -m "not multiprocess"
"""

import glob
import os
import time
import warnings

warnings.filterwarnings("ignore")

_SESSION_START = time.time()


def pytest_sessionfinish(session, exitstatus):
    # DeepSpeed's CPU shared-memory all-reduce never unlinks its 69 MB buffers; the harness
    # removes those of its own ports, this catches the rest made during the session (tmpfs is
    # memory: three suites' worth filled 8.5 GB here)
    for path in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        try:
            if os.stat(path).st_mtime >= _SESSION_START - 1:
                os.unlink(path)
        except OSError:
            pass
