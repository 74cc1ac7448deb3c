"""Limits against exhaustion and the statuses of malformed calls, over real mTLS gRPC."""

from __future__ import annotations

import dataclasses
import logging
import threading

import grpc
import numpy as np
import pytest

from fedpriv.coordinator import Coordinator
from fedpriv.transport import open_channel
from fedpriv.transport.limits import ServerLimits
from fedpriv.transport.options import MAX_MESSAGE_BYTES
from fedpriv.v1 import fleet_pb2, fleet_pb2_grpc, tensor_pb2
from fedpriv.wire import PayloadAssembler, encode_chunks, layout_from_proto
from tests.helpers import CollectingReporter, make_config, silo_thread, wait_silos

CHUNK = 64 << 10
ARRAYS = {"w": np.zeros((256, 256), np.float32), "b": np.zeros(256, np.float32)}
REFUSED = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
# Undecodable as any protobuf message: a varint that never ends.
GARBAGE = b"\xff" * 11


def _config(tmp_path, pki, *, limits: ServerLimits, **rounds):
    config = make_config(tmp_path, pki.root, ARRAYS, chunk_bytes=CHUNK, **rounds)
    return dataclasses.replace(config, limits=limits)


class _Abuser:
    """Opens header-less PushResult streams from one identity and records how each ended.

    A stream the coordinator ends for its timeout is opened again until `stop()`,
    so that the abuser holds its streams for as long as the honest rounds run.
    """

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = fleet_pb2_grpc.FleetStub(channel)
        self._release = threading.Event()
        self._stopped = False
        self._lock = threading.Condition()
        self.codes: list[grpc.StatusCode] = []
        self._open = 0

    def _silence(self):
        self._release.wait()
        return
        yield  # a generator that sends nothing until the test ends

    def open(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._open += 1
        future = self._stub.PushResult.future(self._silence(), timeout=120)
        future.add_done_callback(self._ended)

    def _ended(self, future: grpc.Future) -> None:
        code = future.code()
        with self._lock:
            self.codes.append(code)
            self._open -= 1
            self._lock.notify_all()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self.open()

    def wait_refused(self, count: int, timeout_s: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: len(self.codes) >= count, timeout_s)

    def stop(self, timeout_s: float) -> bool:
        with self._lock:
            self._stopped = True
            done = self._lock.wait_for(lambda: self._open == 0, timeout_s)
        self._release.set()
        return done


@pytest.mark.parametrize("streams", [80, 500])
def test_header_less_streams_from_one_identity_do_not_stall_honest_rounds(
    streams, tmp_path, pki, array_client
):
    # Arrange: the abuser holds its 4 streams, each for 2 s at a time
    limits = ServerLimits(max_streams_per_identity=4, header_timeout_s=2.0)
    config = _config(tmp_path, pki, limits=limits, num_rounds=3, federated_evaluation=False)
    reporter = CollectingReporter()
    with Coordinator(config, reporter=reporter) as coordinator:
        target = f"127.0.0.1:{coordinator.port}"
        with open_channel(target, tls=pki.tls("intruder")) as abuse_channel:
            # Connected first: streams sent before the server's HTTP/2 settings arrive
            # may be refused by HTTP/2 itself (REFUSED_STREAM) instead of the coordinator.
            grpc.channel_ready_future(abuse_channel).result(timeout=10)
            abuser = _Abuser(abuse_channel)
            for _ in range(streams):
                abuser.open()
            # Act: every stream past the cap is refused; 4 are held open
            assert abuser.wait_refused(streams - 4, timeout_s=60)
            assert coordinator.limits.slots.wait_for("intruder", 4, timeout_s=30)
            with open_channel(target, tls=pki.tls("silo-c")) as honest_channel:
                beat = fleet_pb2_grpc.FleetStub(honest_channel).Heartbeat(
                    fleet_pb2.HeartbeatRequest(), timeout=10
                )
            with (
                silo_thread(
                    array_client(delta=1.0), port=coordinator.port, tls=pki.tls("silo-a")
                ) as a,
                silo_thread(
                    array_client(delta=3.0), port=coordinator.port, tls=pki.tls("silo-b")
                ) as b,
            ):
                finished = coordinator.wait(timeout_s=60)
                wait_silos([a, b])
            assert abuser.stop(timeout_s=30)
        final = coordinator.federation.model.arrays()
    # Assert: the honest rounds all completed, with the honest silos' FedAvg...
    assert finished
    assert [s.round for s in reporter.completed] == [1, 2, 3]
    np.testing.assert_array_equal(final["w"], np.full((256, 256), 6.0, np.float32))
    # ...an honest Heartbeat was answered during the attack...
    assert beat.known is False
    # ...and every one of the abuser's streams was refused or timed out.
    assert set(abuser.codes) <= REFUSED
    assert abuser.codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= streams - 4
    assert grpc.StatusCode.DEADLINE_EXCEEDED in abuser.codes


def _pull_train_task(stub):
    """The next TRAIN task and its layout; None once the federation has finished."""
    while True:
        messages = list(stub.PullTask(fleet_pb2.PullTaskRequest(wait_s=2), timeout=30))
        task = messages[0].task
        if task.kind == fleet_pb2.TASK_KIND_FINISHED:
            return None
        if task.kind == fleet_pb2.TASK_KIND_TRAIN:
            layout, _ = layout_from_proto(task.model)
            assembler = PayloadAssembler(layout)
            for m in messages[1:]:
                assembler.add(m.chunk.offset, m.chunk.data)
            return task, layout


def _result(task, layout, arrays, *, then=()):
    header = fleet_pb2.ResultHeader(
        task_id=task.task_id,
        round=task.round,
        kind=task.kind,
        num_examples=5,
        update=layout.to_proto(),
    )
    yield fleet_pb2.ResultMessage(header=header)
    for offset, data in encode_chunks(layout, arrays):
        yield fleet_pb2.ResultMessage(chunk=tensor_pb2.TensorChunk(offset=offset, data=data))
    yield from then


def _raw_silo_round(tmp_path, pki, array_client, push, *, limits):
    """One round with an honest silo (delta 1) and a raw silo-c that calls `push(stub, task,
    layout)`; returns what `push` returned or raised, the reporter and the final model."""
    config = _config(
        tmp_path,
        pki,
        limits=limits,
        num_rounds=1,
        min_clients=2,
        min_results=1,
        federated_evaluation=False,
    )
    reporter = CollectingReporter()
    with Coordinator(config, reporter=reporter) as coordinator:
        credentials = pki.tls("silo-c").channel_credentials()
        target = f"127.0.0.1:{coordinator.port}"
        with (
            silo_thread(array_client(delta=1.0), port=coordinator.port, tls=pki.tls("silo-a")) as a,
            grpc.secure_channel(target, credentials) as channel,
        ):
            stub = fleet_pb2_grpc.FleetStub(channel)
            stub.Join(fleet_pb2.JoinRequest(), timeout=5)
            task, layout = _pull_train_task(stub)
            with pytest.raises(grpc.RpcError) as caught:
                push(stub, task, layout)
            stub.Leave(fleet_pb2.LeaveRequest(reason="test done"), timeout=5)
            assert coordinator.wait(timeout_s=60)
            wait_silos([a])
        final = coordinator.federation.model.arrays()
    return caught.value, reporter, final


def test_an_upload_cut_by_an_oversized_message_is_not_aggregated(tmp_path, pki, array_client):
    # Arrange: in every round, a whole valid update of +100, then one message over
    # gRPC's limit. gRPC's handling of the two may come in either order, so the
    # attack is tried in several rounds.
    rounds = 8
    poison = {k: np.full_like(v, 100.0) for k, v in ARRAYS.items()}
    oversized = fleet_pb2.ResultMessage(
        chunk=tensor_pb2.TensorChunk(offset=0, data=bytes(MAX_MESSAGE_BYTES + 1024))
    )
    config = _config(
        tmp_path,
        pki,
        limits=ServerLimits(),
        num_rounds=rounds,
        min_clients=2,
        min_results=1,
        federated_evaluation=False,
    )
    reporter = CollectingReporter()
    codes = []
    with Coordinator(config, reporter=reporter) as coordinator:
        credentials = pki.tls("silo-c").channel_credentials()
        options = [("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES)]
        target = f"127.0.0.1:{coordinator.port}"
        with (
            silo_thread(array_client(delta=1.0), port=coordinator.port, tls=pki.tls("silo-a")) as a,
            grpc.secure_channel(target, credentials, options=options) as channel,
        ):
            stub = fleet_pb2_grpc.FleetStub(channel)
            stub.Join(fleet_pb2.JoinRequest(), timeout=5)
            # Act
            while (pulled := _pull_train_task(stub)) is not None:
                task, layout = pulled
                with pytest.raises(grpc.RpcError) as caught:
                    stub.PushResult(_result(task, layout, poison, then=[oversized]), timeout=30)
                codes.append(caught.value.code())
            assert coordinator.wait(timeout_s=60)
            wait_silos([a])
        final = coordinator.federation.model.arrays()
    # Assert: refused every time, and the model is the honest silo's alone
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * rounds
    assert [s.accepted for s in reporter.completed] == [1] * rounds
    np.testing.assert_array_equal(final["w"], np.full((256, 256), float(rounds), np.float32))


def test_an_upload_that_stops_sending_ends_with_deadline_exceeded(tmp_path, pki, array_client):
    # Arrange: a header and one chunk, then silence until the coordinator gives up
    release = threading.Event()
    update = {k: np.full_like(v, 100.0) for k, v in ARRAYS.items()}

    def push(stub, task, layout):
        def stalled():
            messages = _result(task, layout, update)
            yield next(messages)
            yield next(messages)
            release.wait()

        try:
            return stub.PushResult(stalled(), timeout=60)
        finally:
            release.set()

    # Act
    error, reporter, final = _raw_silo_round(
        tmp_path, pki, array_client, push, limits=ServerLimits(idle_timeout_s=0.5)
    )
    # Assert
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "idle_timeout_s" in error.details()
    assert reporter.completed[0].accepted == 1
    np.testing.assert_array_equal(final["w"], np.full((256, 256), 1.0, np.float32))


@pytest.fixture
def coordinator(tmp_path, pki):
    with Coordinator(_config(tmp_path, pki, limits=ServerLimits())) as running:
        yield running


def test_a_push_that_starts_with_a_chunk_gets_invalid_argument(coordinator, pki):
    chunk = fleet_pb2.ResultMessage(chunk=tensor_pb2.TensorChunk(offset=0, data=b"\0" * 8))
    with open_channel(f"127.0.0.1:{coordinator.port}", tls=pki.tls("silo-a")) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            fleet_pb2_grpc.FleetStub(channel).PushResult(iter([chunk]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must start with a ResultHeader" in caught.value.details()


def test_undecodable_bytes_get_invalid_argument_and_one_warning_per_identity(
    coordinator, pki, caplog
):
    # Arrange: raw bytes to a unary and a streaming method, many times
    caplog.set_level(logging.INFO)
    with open_channel(f"127.0.0.1:{coordinator.port}", tls=pki.tls("intruder")) as channel:
        heartbeat = channel.unary_unary("/fedpriv.v1.Fleet/Heartbeat")
        push = channel.stream_unary("/fedpriv.v1.Fleet/PushResult")
        codes = []
        # Act
        for _ in range(10):
            for call in (lambda: heartbeat(GARBAGE, timeout=10), lambda: push(iter([GARBAGE]))):
                with pytest.raises(grpc.RpcError) as caught:
                    call()
                codes.append(caught.value.code())
    # Assert: INVALID_ARGUMENT every time, no traceback, one line for the identity
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    about = [r for r in caplog.records if "intruder" in r.getMessage()]
    assert len(about) == 1 and about[0].levelno == logging.WARNING


def test_a_header_over_max_header_bytes_gets_resource_exhausted(tmp_path, pki):
    limits = ServerLimits(max_header_bytes=4096)
    with Coordinator(_config(tmp_path, pki, limits=limits)) as running:
        with open_channel(f"127.0.0.1:{running.port}", tls=pki.tls("silo-a")) as channel:
            header = fleet_pb2.ResultHeader(task_id="x" * 5000, round=1)
            with pytest.raises(grpc.RpcError) as caught:
                fleet_pb2_grpc.FleetStub(channel).PushResult(
                    iter([fleet_pb2.ResultMessage(header=header)]), timeout=10
                )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_header_bytes" in caught.value.details()


def test_connections_past_max_connections_are_closed(tmp_path, pki):
    limits = ServerLimits(max_connections=2)
    with Coordinator(_config(tmp_path, pki, limits=limits)) as running:
        credentials = pki.tls("silo-a").channel_credentials()
        # A subchannel pool of its own, so that each channel opens its own connection.
        options = [("grpc.use_local_subchannel_pool", 1)]
        target = f"127.0.0.1:{running.port}"
        channels = [grpc.secure_channel(target, credentials, options=options) for _ in range(3)]
        try:
            codes = []
            for channel in channels:
                try:
                    fleet_pb2_grpc.FleetStub(channel).Heartbeat(
                        fleet_pb2.HeartbeatRequest(), timeout=5
                    )
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as err:
                    codes.append(err.code())
        finally:
            for channel in channels:
                channel.close()
    assert codes[:2] == [grpc.StatusCode.OK] * 2
    assert codes[2] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_a_client_that_pings_too_often_is_disconnected(tmp_path, pki):
    # Arrange: the server allows a ping every 10 s; the client pings every 100 ms
    limits = ServerLimits(min_ping_interval_s=10, max_ping_strikes=2)
    with Coordinator(_config(tmp_path, pki, limits=limits)) as running:
        options = [
            ("grpc.keepalive_time_ms", 100),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.use_local_subchannel_pool", 1),
        ]
        credentials = pki.tls("silo-a").channel_credentials()
        target = f"127.0.0.1:{running.port}"
        with grpc.secure_channel(target, credentials, options=options) as channel:
            release = threading.Event()

            def silence():
                release.wait()
                yield from ()

            # Act: a call that sends nothing, so that only pings cross the connection
            try:
                with pytest.raises(grpc.RpcError) as caught:
                    fleet_pb2_grpc.FleetStub(channel).PushResult(silence(), timeout=60)
            finally:
                release.set()
    # Assert: the server closed the connection long before the header timeout
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "too many pings" in caught.value.details().lower()


def test_metrics_over_max_metrics_bytes_get_resource_exhausted(tmp_path, pki):
    limits = ServerLimits(max_metrics_bytes=1024)
    metrics = {f"metric_{n}": fleet_pb2.Scalar(double_value=float(n)) for n in range(100)}
    with Coordinator(_config(tmp_path, pki, limits=limits)) as running:
        with open_channel(f"127.0.0.1:{running.port}", tls=pki.tls("silo-a")) as channel:
            header = fleet_pb2.ResultHeader(task_id="t", round=1, metrics=metrics)
            with pytest.raises(grpc.RpcError) as caught:
                fleet_pb2_grpc.FleetStub(channel).PushResult(
                    iter([fleet_pb2.ResultMessage(header=header)]), timeout=10
                )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_metrics_bytes" in caught.value.details()
