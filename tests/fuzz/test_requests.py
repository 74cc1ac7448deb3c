"""Mutated requests to every other RPC, from every kind of caller: each gets an allowed status.

Callers: the fuzzing silos (on the allow list, each holding an open task), the
operator (Admin only), a certificate of the federation that is not on the allow
list, and a certificate of another CA (its handshake fails).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.conftest import FUZZ
from tests.fuzz.harness import OPERATOR, OUTSIDER
from tests.fuzz.mutations import mutate_unary, plans, valid_unary

REQUEST_EXAMPLES = 1200
# Leave settles the caller's task (it counts as dropped): rarer, so rounds stay cheap.
RPCS = ["Join", "PullTask", "Heartbeat", "SecAgg", "SecAgg", "Status", "Join", "Heartbeat", "Leave"]
CALLERS = ["fuzzer", "fuzzer", "fuzzer", "fuzzer", OPERATOR, OUTSIDER, "foreign"]


def test_mutated_requests_to_every_rpc_get_an_allowed_status(fleet):
    @settings(FUZZ, max_examples=REQUEST_EXAMPLES)
    @given(rpc=st.sampled_from(RPCS), caller=st.sampled_from(CALLERS), plan=plans())
    def request(rpc, caller, plan):
        slot = plan.pick(fleet.open_slots())
        silo = slot.silo if caller == "fuzzer" else caller
        valid = valid_unary(rpc, task_id=slot.task.task_id, round=slot.task.round)
        _, message = mutate_unary(
            plan, rpc, valid, task_ids=[slot.task.task_id, *fleet.other_task_ids(slot.silo)]
        )
        fleet.call(silo, rpc, [message])
        if silo == slot.silo:
            fleet.settle(slot)

    request()
    assert not fleet.findings, fleet.report()
