"""Inputs the coordinator once mishandled, with the answers it must give.

A PushResult that starts with a chunk and undecodable bytes got INTERNAL and an
ERROR traceback per call; a message over the size limit after the last chunk
ended the stream like a half-close, and the cut upload was folded.
"""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest

from fedpriv.client import ClientStats
from fedpriv.client.messages import result_messages
from fedpriv.v1 import fleet_pb2
from fedpriv.wire import MAX_CHUNK_BYTES
from fedpriv.wire.frames import chunk_frame, serialize
from tests.fuzz.conftest import ONE_WORKER
from tests.fuzz.harness import OUTSIDER, Slot

pytestmark = ONE_WORKER

UNDECODABLE = b"\xff\xff\xff\xff"  # a tag whose varint never ends: no message type parses it


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_push_result_that_starts_with_a_chunk_gets_invalid_argument(fleet, caplog):
    slot = fleet.open_slots()[0]
    chunk = chunk_frame(0, (bytes(8),), 8)
    code, _, details = fleet.call(slot.silo, "PushResult", [chunk, *slot.valid], count=False)
    fleet.settle(slot)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert not _errors(caplog)


@pytest.mark.parametrize("rpc", ["Join", "PullTask", "PushResult", "Heartbeat", "Leave", "SecAgg"])
def test_undecodable_bytes_get_invalid_argument_and_no_error_log(fleet, caplog, rpc):
    slot = fleet.open_slots()[0]  # PullTask then answers at once
    messages = [UNDECODABLE] if rpc != "PushResult" else [slot.valid[0], UNDECODABLE]
    code, _, details = fleet.call(slot.silo, rpc, messages, count=False)
    fleet.settle(slot)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert not _errors(caplog)


def test_undecodable_bytes_from_a_silo_off_the_allow_list_get_no_error_log(fleet, caplog):
    code, _, details = fleet.call(OUTSIDER, "Join", [UNDECODABLE], count=False)
    assert code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT), details
    assert not _errors(caplog)


def _train_slot(fleet) -> Slot:
    while True:
        for slot in fleet.open_slots():
            if slot.task.kind == fleet_pb2.TASK_KIND_TRAIN:
                return slot
            fleet.finish_slot(slot)


def _phase_of(fleet, slot: Slot):
    """The coordinator's phase that holds `slot`'s task (it outlives its closing)."""
    federation = fleet.coordinator.federation
    with federation.cond:
        phase = federation.phase
    assert phase is not None and phase.tasks.get(slot.silo) == slot.task.task_id
    return phase


def _outcome(fleet, phase, silo: str) -> str:
    """`silo`'s outcome in `phase`, once the coordinator has recorded it."""
    federation = fleet.coordinator.federation
    with federation.cond:  # notified on every outcome
        assert federation.cond.wait_for(lambda: silo in phase.outcomes, timeout=30)
        return phase.outcomes[silo]


ATTEMPTS = 8


def test_an_oversized_message_after_the_last_chunk_leaves_the_upload_out(fleet):
    # Arrange: a complete update far from the FedAvg, then one message over the
    # server's 8 MiB limit; gRPC refuses that message and ends the stream. gRPC may
    # hand the handler the last chunk before or after it ends the stream, so the
    # attack is tried in several tasks.
    codes, outcomes = [], []
    for _ in range(ATTEMPTS):
        slot = _train_slot(fleet)
        assert slot.layout is not None and slot.model is not None
        far = {k: (v + np.float32(100.0)).astype(np.float32) for k, v in slot.model.items()}
        header = fleet_pb2.ResultMessage.FromString(slot.valid[0]).header
        update = [serialize(m) for m in result_messages(header, slot.layout, far, ClientStats())]
        size = 2 * MAX_CHUNK_BYTES + 16
        oversized = chunk_frame(slot.layout.payload_bytes, (bytes(size),), size)
        fleet.wait_honest_accepted(slot)
        phase = _phase_of(fleet, slot)
        # Act
        code, _, _ = fleet.call(slot.silo, "PushResult", [*update, oversized], count=False)
        outcome = _outcome(fleet, phase, slot.silo)
        if outcome == "accepted":
            fleet.note_accepted(slot, update)  # the exact model check must know what was folded
        fleet.settle(slot)
        codes.append(code)
        outcomes.append(outcome)
    # Assert: refused every time, and no upload the refusal cut is in a round
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * ATTEMPTS, (codes, outcomes)
    assert "accepted" not in outcomes, (codes, outcomes)
