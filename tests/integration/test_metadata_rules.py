"""The coordinator's metadata rules over real loopback gRPC (plain text, where metadata names)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from fedpriv.coordinator import Coordinator
from fedpriv.transport.options import CHANNEL_OPTIONS, MAX_METADATA_BYTES
from fedpriv.v1 import fleet_pb2, fleet_pb2_grpc
from tests.helpers import make_config


@pytest.fixture
def fleet(tmp_path):
    config = make_config(tmp_path, None, {"w": np.zeros(4, np.float32)})
    with Coordinator(config, insecure=True) as coordinator:
        with grpc.insecure_channel(
            f"127.0.0.1:{coordinator.port}", options=CHANNEL_OPTIONS
        ) as channel:
            yield fleet_pb2_grpc.FleetStub(channel)


def _join(stub, metadata):
    return stub.Join(fleet_pb2.JoinRequest(sdk_version="0.1.0"), metadata=metadata, timeout=10)


def test_a_valid_plain_text_identity_joins(fleet):
    reply = _join(fleet, (("fedpriv-silo", "silo-a"),))
    assert reply.silo == "silo-a"


@pytest.mark.parametrize(
    "metadata, code, words",
    [
        ((), grpc.StatusCode.UNAUTHENTICATED, "'fedpriv-silo' metadata key"),
        ((("fedpriv-silo", "silo a"),), grpc.StatusCode.UNAUTHENTICATED, "not a valid name"),
        (
            (("fedpriv-silo", "silo-a"), ("padding", "x" * MAX_METADATA_BYTES)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "metadata size",
        ),
    ],
    ids=["no-identity", "invalid-name", "oversized"],
)
def test_calls_that_break_a_metadata_rule_are_refused_with_the_rule(fleet, metadata, code, words):
    with pytest.raises(grpc.RpcError) as raised:
        _join(fleet, metadata)
    assert raised.value.code() == code
    assert words in raised.value.details()
    # The coordinator still serves a well-formed caller afterwards.
    assert _join(fleet, (("fedpriv-silo", "silo-b"),)).silo == "silo-b"
