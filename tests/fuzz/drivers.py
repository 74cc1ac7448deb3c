"""One fuzzing input each: what the tests' hypothesis examples and benchmarks/fuzz_rpcs.py run.

Every function sends one input against a live :class:`~tests.fuzz.harness.FuzzFleet`
and leaves any wrong answer among the fleet's findings.
"""

from __future__ import annotations

import grpc

from fedpriv.v1 import fleet_pb2
from tests.fuzz.harness import OPERATOR, OUTSIDER, Finding, FuzzFleet
from tests.fuzz.mutations import Plan, mutate_stream, mutate_unary, valid_unary

# Leave settles the caller's task (it counts as dropped): rarer, so rounds stay cheap.
RPCS = ("Join", "PullTask", "Heartbeat", "SecAgg", "SecAgg", "Status", "Join", "Heartbeat", "Leave")
CALLERS = ("fuzzer", "fuzzer", "fuzzer", "fuzzer", OPERATOR, OUTSIDER, "foreign")
REPLAY_OPS = ("past_round", "header", "chunk", "duplicate", "truncate")


def fuzz_stream(fleet: FuzzFleet, plan: Plan) -> None:
    """A mutation of a fuzzing silo's valid answer to its open task."""
    slot = plan.pick(fleet.open_slots())
    _, messages = mutate_stream(
        plan,
        slot.valid,
        task_ids=fleet.other_task_ids(slot.silo),
        past=[stream for _, stream in fleet.past_valid],
    )
    fleet.push(slot, messages)


def fuzz_request(fleet: FuzzFleet, rpc: str, caller: str, plan: Plan) -> None:
    """A mutated request of a unary RPC (or PullTask) from `caller`."""
    slot = plan.pick(fleet.open_slots())  # a fuzzing silo's PullTask then answers at once
    silo = slot.silo if caller == "fuzzer" else caller
    valid = valid_unary(rpc, task_id=slot.task.task_id, round=slot.task.round)
    _, message = mutate_unary(
        plan, rpc, valid, task_ids=[slot.task.task_id, *fleet.other_task_ids(slot.silo)]
    )
    fleet.call(silo, rpc, [message])
    if silo == slot.silo:
        fleet.settle(slot)


def _retarget(message: bytes, task_id: str) -> bytes:
    parsed = fleet_pb2.ResultMessage.FromString(message)
    parsed.header.task_id = task_id
    return parsed.SerializeToString()


def fuzz_replay(fleet: FuzzFleet, plan: Plan) -> None:
    """An earlier task's answer (as sent, or mutated), or this answer under another's task id.

    None of them answers the silo's open task: each must be refused.
    """
    slot = plan.pick(fleet.open_slots())
    how = plan.pick(["past", "other", "mutated_past"])
    if how == "other" and fleet.other_task_ids(slot.silo):
        stolen = plan.pick(fleet.other_task_ids(slot.silo))
        messages = [_retarget(slot.valid[0], stolen), *slot.valid[1:]]
    elif fleet.past_valid:
        _, past = plan.pick(fleet.past_valid)
        messages = list(past)
        if how == "mutated_past":
            _, messages = mutate_stream(plan, past, task_ids=[], past=[])
    else:
        return
    code, _, details = fleet.call(slot.silo, "PushResult", messages)
    if code is grpc.StatusCode.OK:
        fleet.findings.append(
            Finding(
                "PushResult", slot.silo, code.name, details, messages, f"a {how} replay was taken"
            )
        )
    fleet.settle(slot)
