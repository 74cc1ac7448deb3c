"""Replays, duplicates and other silos' task ids: refused, and never counted twice."""

from __future__ import annotations

import grpc
from hypothesis import given, settings

from fedpriv.v1 import fleet_pb2
from tests.fuzz.conftest import FUZZ
from tests.fuzz.mutations import mutate_stream, plans

REPLAY_EXAMPLES = 150


def _retarget(message: bytes, task_id: str) -> bytes:
    parsed = fleet_pb2.ResultMessage.FromString(message)
    parsed.header.task_id = task_id
    return parsed.SerializeToString()


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
    @given(plan=plans(ops=["past_round", "header", "chunk", "duplicate", "truncate"]))
    def replay(plan):
        slot = plan.pick(fleet.open_slots())
        how = plan.pick(["past", "other", "mutated_past"])
        if how == "other" and fleet.other_task_ids(slot.silo):
            # This silo's valid answer, under another silo's task id.
            stolen = plan.pick(fleet.other_task_ids(slot.silo))
            messages = [_retarget(slot.valid[0], stolen), *slot.valid[1:]]
        elif fleet.past_valid:
            _, past = plan.pick(fleet.past_valid)
            messages = list(past)
            if how == "mutated_past":
                _, messages = mutate_stream(plan, past, task_ids=[], past=[])
        else:
            messages = slot.valid
        code, _, _ = fleet.call(slot.silo, "PushResult", messages)
        if messages is not slot.valid:
            # Never an answer to this silo's open task: refused, and the task stays open.
            assert code != grpc.StatusCode.OK, (how, fleet.report())
        fleet.settle(slot)

    replay()
    assert not fleet.findings, fleet.report()
