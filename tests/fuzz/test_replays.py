"""Replays, duplicates and other silos' task ids: refused, and never counted twice."""

from __future__ import annotations

import grpc
from hypothesis import given, settings

from tests.fuzz.conftest import FUZZ, ONE_WORKER
from tests.fuzz.drivers import REPLAY_OPS, fuzz_replay
from tests.fuzz.mutations import plans

pytestmark = ONE_WORKER

REPLAY_EXAMPLES = 150


def test_the_same_upload_twice_is_accepted_once(fleet):
    slot = fleet.open_slots()[0]
    first = fleet.push(slot, slot.valid)
    assert first == grpc.StatusCode.OK, fleet.report()
    # The silo's task is answered: the same bytes again are refused and not folded.
    code, _, details = fleet.call(slot.silo, "PushResult", slot.valid)
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert not fleet.findings, fleet.report()


def test_replays_of_past_rounds_and_other_silos_tasks_are_refused(fleet):
    @settings(FUZZ, max_examples=REPLAY_EXAMPLES)
    @given(plan=plans(ops=REPLAY_OPS))
    def replay(plan):
        fuzz_replay(fleet, plan)

    replay()
    assert not fleet.findings, fleet.report()
