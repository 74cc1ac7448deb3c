"""Mutated PushResult streams against a live round: every one gets an allowed status.

Each example answers a fuzzing silo's open task (TRAIN or EVALUATE) with a
mutation of the valid answer. The honest silos' uploads are already folded when
it arrives; the model served in the next round is checked against the exact
FedAvg of what the coordinator accepted (see harness.py).
"""

from __future__ import annotations

from hypothesis import given, settings

from tests.fuzz.conftest import FUZZ, ONE_WORKER
from tests.fuzz.drivers import fuzz_stream
from tests.fuzz.mutations import plans

pytestmark = ONE_WORKER

STREAM_EXAMPLES = 800


def test_mutated_result_streams_get_an_allowed_status_and_the_model_stays_exact(fleet):
    rounds_before = fleet.rounds_checked

    @settings(FUZZ, max_examples=STREAM_EXAMPLES)
    @given(plan=plans())
    def answer(plan):
        fuzz_stream(fleet, plan)

    answer()
    assert not fleet.findings, fleet.report()
    # The rounds moved on while the inputs settled tasks, and each was checked exactly.
    assert fleet.rounds_checked > rounds_before, fleet.report()
