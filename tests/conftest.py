"""Test-suite set-up: the `multiprocess` marker.

Tests that start ranks (tests.harness.run_ranks / run_torchrun) carry
`@pytest.mark.multiprocess` (or `pytestmark` for a whole module), so the pure-function tests
run alone in seconds:  python3 -m pytest -q -m "not multiprocess"
"""

import warnings

warnings.filterwarnings("ignore")
