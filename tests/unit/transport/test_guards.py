"""The limits' parts without sockets: refusal log, stream slots, guarded decoding, timed reads."""

from __future__ import annotations

import logging
import pathlib
import threading
import tomllib

import grpc
import pytest

from fedpriv.coordinator import CoordinatorConfig
from fedpriv.errors import ConfigError, LimitExceeded, MalformedMessage, StreamCut, StreamStalled
from fedpriv.transport.guards import (
    Refusal,
    RefusalLog,
    StreamSlots,
    TimedReader,
    guard_deserializer,
)
from fedpriv.transport.limits import ServerLimits
from fedpriv.v1 import fleet_pb2, tensor_pb2
from fedpriv.wire.frames import chunk_frame, parse_with_chunks


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_refusal_log_writes_one_line_per_identity_per_interval(caplog):
    # Arrange
    caplog.set_level(logging.WARNING, logger="fedpriv.transport.guards")
    clock = FakeClock()
    log = RefusalLog(interval_s=60.0, clock=clock)
    # Act: 100 refusals of one identity, 1 of another, within the interval...
    logged = [log.refused("mallory", "max_streams_per_identity", "x") for _ in range(100)]
    log.refused("silo-b", "decoding", "y")
    clock.now = 60.0
    # ...then one after it, which reports the suppressed count
    log.refused("mallory", "header_timeout_s", "z")
    # Assert
    assert logged == [True] + [False] * 99
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "identity=mallory" in lines[0] and "suppressed=0" in lines[0]
    assert "identity=silo-b" in lines[1]
    assert "suppressed=99" in lines[2] and "header_timeout_s" in lines[2]


def test_refusal_log_tracks_a_bounded_number_of_identities():
    clock = FakeClock()
    log = RefusalLog(interval_s=60.0, clock=clock, max_identities=3)
    for n in range(10):
        assert log.refused(f"name-{n}", "decoding", "x")
    assert len(log._last) == 3
    assert log.refused("name-0", "decoding", "x")  # forgotten, so logged again


def test_stream_slots_cap_each_identity_and_free_on_release():
    slots = StreamSlots(per_identity=2)
    assert slots.acquire("a") and slots.acquire("a")
    assert not slots.acquire("a")
    assert slots.acquire("b")
    slots.release("a")
    assert slots.held("a") == 1 and slots.acquire("a")
    for _ in range(2):
        slots.release("a")
    assert slots.held("a") == 0 and slots.wait_for("a", 0, timeout_s=0)


def _refuse(error, limit, detail):
    return error(f"{limit}: {detail}")


class Blocking:
    """A request iterator that yields `items`, then blocks until released."""

    def __init__(self, items=()) -> None:
        self._items = list(items)
        self.release = threading.Event()

    def __iter__(self):
        return self

    def __next__(self):
        if self._items:
            return self._items.pop(0)
        self.release.wait()
        raise StopIteration


def test_timed_reader_ends_a_stream_without_a_first_message():
    source = Blocking()
    reader = TimedReader(source, first_timeout_s=0.05, idle_timeout_s=60, refuse=_refuse)
    with pytest.raises(StreamStalled, match="header_timeout_s"):
        next(reader)
    source.release.set()
    with pytest.raises(StopIteration):
        next(reader)  # closed: the handler never reads again


def test_timed_reader_ends_a_stream_that_stops_sending():
    source = Blocking(["header", "chunk"])
    reader = TimedReader(source, first_timeout_s=60, idle_timeout_s=0.05, refuse=_refuse)
    assert [next(reader), next(reader)] == ["header", "chunk"]
    with pytest.raises(StreamStalled, match="nothing after message 2"):
        next(reader)
    source.release.set()


def test_timed_reader_passes_a_whole_stream_and_its_end():
    items = [f"m{n}" for n in range(50)]
    reader = TimedReader(iter(items), first_timeout_s=60, idle_timeout_s=60, refuse=_refuse)
    assert list(reader) == items


def test_timed_reader_passes_the_streams_error():
    class Broken:
        def __iter__(self):
            return self

        def __next__(self):
            raise RuntimeError("cancelled")

    reader = TimedReader(Broken(), first_timeout_s=60, idle_timeout_s=60, refuse=_refuse)
    with pytest.raises(RuntimeError, match="cancelled"):
        next(reader)


def test_timed_reader_treats_an_error_right_after_the_end_as_a_cut_stream():
    class EndsThenFails:
        calls = 0

        def __iter__(self):
            return self

        def __next__(self):
            self.calls += 1
            if self.calls == 1:
                return "header"
            if self.calls == 2:
                raise StopIteration
            raise grpc.RpcError()  # what gRPC raises on a cancelled call

    reader = TimedReader(EndsThenFails(), first_timeout_s=60, idle_timeout_s=60, refuse=_refuse)
    assert next(reader) == "header"
    with pytest.raises(StreamCut, match="cut after 1 messages"):
        next(reader)


def test_timed_reader_refuses_a_guarded_message():
    refusal = Refusal(MalformedMessage, "decoding", "11 bytes")
    reader = TimedReader(iter([refusal]), first_timeout_s=60, idle_timeout_s=60, refuse=_refuse)
    with pytest.raises(MalformedMessage, match="decoding: 11 bytes"):
        next(reader)


def test_guarded_deserializer_turns_undecodable_bytes_into_a_refusal():
    deserialize = guard_deserializer(fleet_pb2.HeartbeatRequest.FromString, max_header_bytes=1024)
    refused = deserialize(b"\xff" * 11)
    assert isinstance(refused, Refusal) and refused.error is MalformedMessage
    assert isinstance(deserialize(b""), fleet_pb2.HeartbeatRequest)


def test_guarded_deserializer_bounds_everything_but_chunks():
    deserialize = guard_deserializer(
        parse_with_chunks(fleet_pb2.ResultMessage.FromString), max_header_bytes=1024
    )
    header = fleet_pb2.ResultMessage(header=fleet_pb2.ResultHeader(task_id="x" * 2000))
    refused = deserialize(header.SerializeToString())
    assert isinstance(refused, Refusal) and refused.error is LimitExceeded
    assert refused.limit == "max_header_bytes"
    # A hand-framed chunk, and one from generated code with an extra field, pass.
    framed = chunk_frame(0, (bytes(4096),), 4096)
    assert not isinstance(deserialize(framed), Refusal)
    generated = fleet_pb2.ResultMessage(chunk=tensor_pb2.TensorChunk(offset=8, data=bytes(4096)))
    assert deserialize(generated.SerializeToString() + b"\x08\x01").WhichOneof("part") == "chunk"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_streams_per_identity": 0}, "limits.max_streams_per_identity = 0: must be >= 1"),
        ({"header_timeout_s": 0.0}, "limits.header_timeout_s = 0.0: must be > 0"),
        ({"max_header_bytes": 10}, "limits.max_header_bytes = 10: must be in [1024"),
        ({"max_ping_strikes": -1}, "limits.max_ping_strikes = -1: must be >= 0"),
        (
            {"max_streams_per_identity": 8, "max_concurrent_rpcs": 8},
            "must be less than limits.max_concurrent_rpcs (8)",
        ),
    ],
)
def test_out_of_range_limits_name_the_field(values, message):
    with pytest.raises(ConfigError) as caught:
        ServerLimits(**values)
    assert message in str(caught.value)


def test_limits_table_is_parsed_and_sets_the_grpc_options():
    text = """
[model]
factory = "pkg.mod:make"
[limits]
max_streams_per_identity = 2
idle_timeout_s = 30
max_connections = 50
min_ping_interval_s = 5
"""
    config = CoordinatorConfig.from_dict(tomllib.loads(text), base_dir=pathlib.Path("/etc"))
    assert config.limits.max_streams_per_identity == 2
    assert config.limits.idle_timeout_s == 30.0
    assert config.limits.header_timeout_s == ServerLimits().header_timeout_s
    options = dict(config.limits.server_options())
    assert options["grpc.max_allowed_incoming_connections"] == 50
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 5000
    assert options["grpc.keepalive_permit_without_calls"] == 1


def test_unknown_and_mistyped_limits_keys_are_refused():
    base = '[model]\nfactory = "pkg.mod:make"\n[limits]\n'
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in \[limits\]: max_stream"):
        CoordinatorConfig.from_dict(
            tomllib.loads(base + "max_stream = 3\n"), base_dir=pathlib.Path("/")
        )
    with pytest.raises(ConfigError, match="limits.header_timeout_s: expected float"):
        CoordinatorConfig.from_dict(
            tomllib.loads(base + 'header_timeout_s = "10"\n'), base_dir=pathlib.Path("/")
        )
