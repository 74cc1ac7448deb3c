"""After every fuzzing test: the committed model is exact, and the suite tried enough inputs."""

from __future__ import annotations

import os

import pytest

from tests.fuzz.conftest import ONE_WORKER

pytestmark = ONE_WORKER

MIN_INPUTS = 2_000
PROPERTY_TESTS = (
    "test_streams.py::test_mutated_result_streams_get_an_allowed_status_and_the_model_stays_exact",
    "test_requests.py::test_mutated_requests_to_every_rpc_get_an_allowed_status",
    "test_replays.py::test_replays_of_past_rounds_and_other_silos_tasks_are_refused",
)


def test_the_committed_model_is_the_exact_fedavg_of_the_accepted_uploads(fleet):
    round = fleet.check_committed()
    assert round >= 1, fleet.report()
    assert not fleet.findings, fleet.report()


def test_the_suite_tried_at_least_2000_mutated_inputs(fleet):
    # Each pytest-xdist worker has a fleet of its own: the count is only meaningful when every
    # property test ran against this one, before this test.
    missing = [test for test in PROPERTY_TESTS if test not in fleet.tests]
    if missing:
        why = f"these fuzz tests did not run against this test's fleet first: {missing}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the whole fuzz suite in one process; {why}")
        pytest.skip(why)
    tried = sum(fleet.inputs.values())
    assert tried >= MIN_INPUTS, fleet.report()
