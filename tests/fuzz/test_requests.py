"""Mutated requests to every other RPC, from every kind of caller: each gets an allowed status.

Callers: the fuzzing silos (on the allow list, each holding an open task), the
operator (Admin only), a certificate of the federation that is not on the allow
list, and a certificate of another CA (its handshake fails).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.conftest import FUZZ, ONE_WORKER
from tests.fuzz.drivers import CALLERS, RPCS, fuzz_request
from tests.fuzz.mutations import plans

pytestmark = ONE_WORKER

REQUEST_EXAMPLES = 1200


def test_mutated_requests_to_every_rpc_get_an_allowed_status(fleet):
    @settings(FUZZ, max_examples=REQUEST_EXAMPLES)
    @given(rpc=st.sampled_from(RPCS), caller=st.sampled_from(CALLERS), plan=plans())
    def request(rpc, caller, plan):
        fuzz_request(fleet, rpc, caller, plan)

    request()
    assert not fleet.findings, fleet.report()
