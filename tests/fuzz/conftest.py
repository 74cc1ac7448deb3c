"""One live federation for the whole fuzz suite, and the fixed hypothesis profile it runs under."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.fuzz.harness import FuzzFleet

# CI runs the same inputs every time (derandomize), never times one example out (the
# server's answer is bounded by the call timeout instead) and keeps no example database.
settings.register_profile(
    "fuzz-ci",
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=False,
)
FUZZ = settings.get_profile("fuzz-ci")

# Every fuzz module sets pytestmark = ONE_WORKER: under pytest-xdist (--dist loadgroup) the
# fuzz tests would run in one worker, because they share one fleet and test_totals counts its
# inputs. pytest 9.2 no longer honours that mark (xdist 3.8 renames a node id that pytest now
# derives), so `make test` runs tests/fuzz in a process of its own, and test_totals checks that
# the tests it sums ran against its fleet instead of trusting the mark.
ONE_WORKER = pytest.mark.xdist_group("fuzz")


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory, pki) -> Iterator[FuzzFleet]:
    with FuzzFleet(tmp_path_factory.mktemp("fuzz"), pki) as running:
        yield running
        # Shown with -s (or in the log of a failing run): what the suite tried and saw.
        print("\n" + running.report())


@pytest.fixture(autouse=True)
def _recorded(request: pytest.FixtureRequest) -> None:
    """Note on the fleet every test that uses it, so test_totals sees what ran against it."""
    if "fleet" in request.fixturenames:
        fleet: FuzzFleet = request.getfixturevalue("fleet")
        fleet.tests.add(request.node.nodeid.split("tests/fuzz/")[-1].split("[")[0])
