"""One identity, one session: duplicates are refused, broken uploads count as dropped.

Real gRPC over mTLS on 127.0.0.1:0. Two channels under the same certificate are
two connections presenting one identity, as two processes holding the same
silo key would be.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from fedpriv.coordinator import Coordinator, Store, read_checkpoint
from fedpriv.coordinator import upload as upload_module
from fedpriv.coordinator.audit import AuditKind
from fedpriv.transport import open_channel
from fedpriv.v1 import fleet_pb2, fleet_pb2_grpc, tensor_pb2
from fedpriv.wire import Model, PayloadAssembler, TensorLayout, layout_from_proto
from tests.helpers import CollectingReporter, make_config, silo_thread, wait_silos

CHUNK = 4096
ARRAYS = {"w": np.zeros((32, 64), np.float32), "b": np.zeros(64, np.float32)}


class EventReporter(CollectingReporter):
    def __init__(self) -> None:
        super().__init__()
        self.attempt_failed = threading.Event()

    def round_failed(self, round: int, reason: str) -> None:
        super().round_failed(round, reason)
        self.attempt_failed.set()


def _pull_train_task(stub) -> tuple[fleet_pb2.Task, TensorLayout]:
    while True:
        messages = list(stub.PullTask(fleet_pb2.PullTaskRequest(wait_s=2), timeout=30))
        task = messages[0].task
        if task.kind == fleet_pb2.TASK_KIND_TRAIN:
            layout, _ = layout_from_proto(task.model)
            assembler = PayloadAssembler(layout)
            for m in messages[1:]:
                assembler.add(m.chunk.offset, m.chunk.data)
            assembler.finish()
            return task, layout


def _upload(task, layout: TensorLayout, value: float) -> list[fleet_pb2.ResultMessage]:
    arrays = {s.name: np.full(s.shape, value, np.float32) for s in layout.specs}
    header = fleet_pb2.ResultHeader(
        task_id=task.task_id,
        round=task.round,
        kind=task.kind,
        num_examples=10,
        update=layout.to_proto(),
    )
    return [fleet_pb2.ResultMessage(header=header)] + [
        fleet_pb2.ResultMessage(chunk=tensor_pb2.TensorChunk(offset=o, data=bytes(c)))
        for o, c in Model.from_arrays(arrays, layout=layout).chunks()
    ]


@pytest.fixture
def chunk_seen(monkeypatch) -> dict[str, threading.Event]:
    """``chunk_seen[silo]`` is set once the coordinator has taken in a chunk from `silo`."""
    seen: dict[str, threading.Event] = {}
    original = upload_module.Upload.add_chunk

    def add_chunk(self, offset, data):
        original(self, offset, data)
        seen.setdefault(self.silo, threading.Event()).set()

    monkeypatch.setattr(upload_module.Upload, "add_chunk", add_chunk)
    return seen


def _seen(chunk_seen, silo) -> threading.Event:
    return chunk_seen.setdefault(silo, threading.Event())


def _audit(config):
    store = Store(config.state_dir)
    try:
        return store.audit.entries()
    finally:
        store.close()


def _wait_open_calls(coordinator, identity: str, count: int) -> None:
    sessions = coordinator.federation.sessions
    with sessions.changed:  # notified whenever a call starts or ends
        assert sessions.changed.wait_for(lambda: sessions.open_calls(identity) == count, 30)


def test_a_second_connection_is_refused_on_every_call_while_the_first_is_in_one(tmp_path, pki):
    # Arrange: a round needs two silos, so silo-a's first session waits in a long-poll
    config = dataclasses.replace(
        make_config(tmp_path, pki.root, ARRAYS, chunk_bytes=CHUNK, min_clients=2),
        poll_wait_s=60,
    )
    with (
        Coordinator(config) as coordinator,
        open_channel(f"127.0.0.1:{coordinator.port}", tls=pki.tls("silo-a")) as first,
        open_channel(f"127.0.0.1:{coordinator.port}", tls=pki.tls("silo-a")) as second,
    ):
        one, two = fleet_pb2_grpc.FleetStub(first), fleet_pb2_grpc.FleetStub(second)
        assert one.Join(fleet_pb2.JoinRequest(), timeout=5).silo == "silo-a"
        _wait_open_calls(coordinator, "silo-a", 0)
        poll = one.PullTask(fleet_pb2.PullTaskRequest(wait_s=60), timeout=90)
        _wait_open_calls(coordinator, "silo-a", 1)
        # Act: the second connection tries every call a silo makes
        refused = {}
        calls = {
            "Join": lambda: two.Join(fleet_pb2.JoinRequest(), timeout=5),
            "PullTask": lambda: list(two.PullTask(fleet_pb2.PullTaskRequest(wait_s=1), timeout=5)),
            "Heartbeat": lambda: two.Heartbeat(fleet_pb2.HeartbeatRequest(), timeout=5),
            "Leave": lambda: two.Leave(fleet_pb2.LeaveRequest(reason="hijack"), timeout=5),
            "PushResult": lambda: two.PushResult(
                iter([fleet_pb2.ResultMessage(header=fleet_pb2.ResultHeader(task_id="t"))]),
                timeout=5,
            ),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as caught:
                call()
            refused[name] = (caught.value.code(), caught.value.details())
        still_there = coordinator.federation.available()
        # ...the first session is unaffected, and once it leaves the identity is free
        assert one.Heartbeat(fleet_pb2.HeartbeatRequest(), timeout=5).known
        one.Leave(fleet_pb2.LeaveRequest(reason="done"), timeout=5)
        assert two.Join(fleet_pb2.JoinRequest(), timeout=5).silo == "silo-a"
        poll.cancel()
        two.Leave(fleet_pb2.LeaveRequest(reason="done"), timeout=5)
    # Assert: ALREADY_EXISTS, naming the identity and the live session, on every call
    for name, (code, details) in refused.items():
        assert code == grpc.StatusCode.ALREADY_EXISTS, name
        assert "'silo-a' already has a live session, which is in a call" in details, name
    assert still_there == ["silo-a"]  # the refused Leave did not remove the first session
    entries = _audit(config)
    kinds = [(e.kind, e.identity) for e in entries]
    assert kinds.count((AuditKind.DUPLICATE, "silo-a")) == len(calls)
    assert kinds.count((AuditKind.JOIN, "silo-a")) == 2
    assert kinds.count((AuditKind.LEAVE, "silo-a")) == 2
    duplicate = next(e for e in entries if e.kind is AuditKind.DUPLICATE)
    first_join = next(e for e in entries if e.kind is AuditKind.JOIN)
    # The two connections are told apart by their peer addresses (another port).
    assert duplicate.peer.startswith("ipv4:127.0.0.1:") and first_join.peer.startswith("ipv4:")
    assert duplicate.peer != first_join.peer
    assert first_join.peer in duplicate.detail


def test_a_restarted_silo_takes_over_a_session_without_open_calls_and_the_old_is_refused(
    tmp_path, pki
):
    # Arrange: the first connection joined and has no call open (it crashed, or trains)
    config = make_config(tmp_path, pki.root, ARRAYS, chunk_bytes=CHUNK, min_clients=2)
    with (
        Coordinator(config) as coordinator,
        open_channel(f"127.0.0.1:{coordinator.port}", tls=pki.tls("silo-a")) as first,
        open_channel(f"127.0.0.1:{coordinator.port}", tls=pki.tls("silo-a")) as second,
    ):
        old, new = fleet_pb2_grpc.FleetStub(first), fleet_pb2_grpc.FleetStub(second)
        old.Join(fleet_pb2.JoinRequest(), timeout=5)
        _wait_open_calls(coordinator, "silo-a", 0)
        # Act
        assert new.Join(fleet_pb2.JoinRequest(), timeout=5).silo == "silo-a"
        with pytest.raises(grpc.RpcError) as caught:
            old.Heartbeat(fleet_pb2.HeartbeatRequest(), timeout=5)
        assert new.Heartbeat(fleet_pb2.HeartbeatRequest(), timeout=5).known
        new.Leave(fleet_pb2.LeaveRequest(reason="done"), timeout=5)
    # Assert
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "took this identity over from this session" in caught.value.details()
    entries = _audit(config)
    joins = [e for e in entries if e.kind is AuditKind.JOIN]
    (takeover,) = [e for e in entries if e.kind is AuditKind.TAKEOVER]
    assert takeover.peer == joins[1].peer and joins[0].peer in takeover.detail


def test_two_silo_processes_sharing_a_certificate_are_counted_once(tmp_path, pki, array_client):
    # Arrange: silo-a runs twice (one of the two is refused), silo-b once; each adds its delta
    config = make_config(
        tmp_path, pki.root, ARRAYS, chunk_bytes=CHUNK, min_clients=2, federated_evaluation=False
    )
    reporter = CollectingReporter()
    with Coordinator(config, reporter=reporter) as coordinator:
        port = coordinator.port
        with silo_thread(array_client(delta=1.0), port=port, tls=pki.tls("silo-a")) as a:
            with coordinator.federation.cond:  # notified on every join
                assert coordinator.federation.cond.wait_for(
                    lambda: coordinator.federation.registry.known("silo-a"), timeout=30
                )
            with (
                silo_thread(array_client(delta=1.0), port=port, tls=pki.tls("silo-a")) as twin,
                silo_thread(array_client(delta=3.0), port=port, tls=pki.tls("silo-b")) as b,
            ):
                # Act
                assert coordinator.wait(timeout_s=60, finish_grace_s=0)
                # The refused silo-a is stopped on leaving the block: it would be let in
                # (and told FINISHED) only once the other one's session has gone silent.
                wait_silos([b])
    # Assert: the mean of +1 and +3 (+1 counted twice would give 5/3)
    store = Store(config.state_dir)
    committed = store.last_committed()
    store.close()
    final = read_checkpoint(committed.checkpoint, sha256=committed.sha256).arrays()
    np.testing.assert_array_equal(final["w"], np.full((32, 64), 2.0, np.float32))
    assert reporter.completed[0].accepted == 2
    assert "error" not in twin and "error" not in a
    # The twin's first call was refused or took over; either is on record.
    refusals = [e for e in _audit(config) if e.identity == "silo-a"]
    assert {AuditKind.DUPLICATE, AuditKind.TAKEOVER} & {e.kind for e in refusals}


def test_the_same_upload_twice_and_two_concurrent_streams_of_one_identity_count_once(
    tmp_path, pki, array_client, chunk_seen
):
    # Arrange: silo-a and silo-b are honest SDK silos; silo-c is a raw stream; silo-d
    # holds its task (keeping the round open) until silo-c is done
    config = make_config(
        tmp_path,
        pki.root,
        ARRAYS,
        chunk_bytes=CHUNK,
        min_clients=4,
        min_results=3,
        federated_evaluation=False,
    )
    reporter = CollectingReporter()
    release = threading.Event()
    address = "127.0.0.1:{port}"
    with Coordinator(config, reporter=reporter) as coordinator:
        port = coordinator.port
        with (
            silo_thread(array_client(delta=1.0), port=port, tls=pki.tls("silo-a")) as a,
            silo_thread(array_client(delta=3.0), port=port, tls=pki.tls("silo-b")) as b,
            open_channel(address.format(port=port), tls=pki.tls("silo-c")) as channel,
            open_channel(address.format(port=port), tls=pki.tls("silo-d")) as holder,
        ):
            stub, held = fleet_pb2_grpc.FleetStub(channel), fleet_pb2_grpc.FleetStub(holder)
            stub.Join(fleet_pb2.JoinRequest(), timeout=5)
            held.Join(fleet_pb2.JoinRequest(), timeout=5)
            task, layout = _pull_train_task(stub)
            _pull_train_task(held)
            messages = _upload(task, layout, 5.0)

            def held_open() -> Iterator[fleet_pb2.ResultMessage]:
                yield from messages[:2]
                release.wait(60)
                yield from messages[2:]

            # Act: a first stream is open (one chunk in) when a second one starts...
            first = stub.PushResult.future(held_open(), timeout=60)
            assert _seen(chunk_seen, "silo-c").wait(60)
            with pytest.raises(grpc.RpcError) as concurrent:
                stub.PushResult(iter(messages), timeout=30)
            release.set()
            assert first.result().accepted
            # ...and once it is accepted, the same upload is sent again
            with pytest.raises(grpc.RpcError) as replayed:
                stub.PushResult(iter(messages), timeout=30)
            stub.Leave(fleet_pb2.LeaveRequest(reason="done"), timeout=5)
            held.Leave(fleet_pb2.LeaveRequest(reason="done"), timeout=5)
            assert coordinator.wait(timeout_s=60)
            wait_silos([a, b])
    # Assert: both refused with a clear reason; the model is the mean of +1, +3, +5
    assert concurrent.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already has an upload open" in concurrent.value.details()
    assert replayed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already sent a result" in replayed.value.details()
    store = Store(config.state_dir)
    committed = store.last_committed()
    outcomes = {silo: outcome for _, silo, outcome, _ in store.participants(1)}
    store.close()
    final = read_checkpoint(committed.checkpoint, sha256=committed.sha256).arrays()
    np.testing.assert_array_equal(final["w"], np.full((32, 64), 3.0, np.float32))
    assert outcomes == {
        "silo-a": "accepted",
        "silo-b": "accepted",
        "silo-c": "accepted",
        "silo-d": "dropped",
    }


def test_a_cancelled_upload_is_dropped_and_the_retried_round_does_not_wait_for_its_silo(
    tmp_path, pki, array_client, chunk_seen
):
    # Arrange: two results are needed. The first attempt has silo-a and silo-c; silo-c
    # cancels its upload, so the attempt fails. A silent silo would count as live for
    # 180 s (heartbeat_interval_s = 60), far beyond the 30 s deadline of a round.
    config = dataclasses.replace(
        make_config(
            tmp_path,
            pki.root,
            ARRAYS,
            chunk_bytes=CHUNK,
            min_clients=2,
            deadline_s=30.0,
            federated_evaluation=False,
        ),
        heartbeat_interval_s=60,
    )
    reporter = EventReporter()
    release = threading.Event()
    with Coordinator(config, reporter=reporter) as coordinator:
        port = coordinator.port
        with open_channel(f"127.0.0.1:{port}", tls=pki.tls("silo-c")) as channel:
            stub = fleet_pb2_grpc.FleetStub(channel)
            stub.Join(fleet_pb2.JoinRequest(), timeout=5)
            with silo_thread(array_client(delta=1.0), port=port, tls=pki.tls("silo-a")) as a:
                task, layout = _pull_train_task(stub)
                messages = _upload(task, layout, 5.0)

                def cut_off() -> Iterator[fleet_pb2.ResultMessage]:
                    yield from messages[:2]
                    release.wait(60)

                # Act: one chunk in, then the stream is cancelled (as by a killed silo)
                call = stub.PushResult.future(cut_off(), timeout=60)
                assert _seen(chunk_seen, "silo-c").wait(60)
                call.cancel()
                release.set()
                assert reporter.attempt_failed.wait(60)
                gone = "silo-c" not in coordinator.federation.available()
                # ...and a third silo makes the retried attempt possible
                with silo_thread(array_client(delta=3.0), port=port, tls=pki.tls("silo-b")) as b:
                    assert coordinator.wait(timeout_s=60)
                    wait_silos([a, b])
    # Assert: dropped (not rejected), gone at once, and not selected again
    assert gone
    store = Store(config.state_dir)
    rows = store.participants(1)
    selected = store._db.execute("SELECT selected FROM rounds WHERE round = 1").fetchone()[0]
    store.close()
    silo_c = [(outcome, detail) for _, silo, outcome, detail in rows if silo == "silo-c"]
    assert len(silo_c) == 1 and silo_c[0][0] == "dropped", silo_c
    assert "broke off" in silo_c[0][1]
    assert selected == 2 and reporter.completed[0].accepted == 2
    gone_entries = [e for e in _audit(config) if e.kind is AuditKind.GONE]
    assert [e.identity for e in gone_entries] == ["silo-c"]
    assert gone_entries[0].peer.startswith("ipv4:127.0.0.1:")


def test_a_real_round_leaves_join_rejection_and_leave_entries_with_identity_and_peer(
    tmp_path, pki, array_client
):
    # Arrange: silo-c sends NaN; the round completes with silo-a and silo-b
    config = make_config(
        tmp_path,
        pki.root,
        ARRAYS,
        chunk_bytes=CHUNK,
        min_clients=3,
        min_results=2,
        federated_evaluation=False,
    )
    with Coordinator(config) as coordinator:
        with (
            silo_thread(array_client(delta=1.0), port=coordinator.port, tls=pki.tls("silo-a")) as a,
            silo_thread(array_client(delta=3.0), port=coordinator.port, tls=pki.tls("silo-b")) as b,
            open_channel(f"127.0.0.1:{coordinator.port}", tls=pki.tls("silo-c")) as channel,
        ):
            stub = fleet_pb2_grpc.FleetStub(channel)
            stub.Join(fleet_pb2.JoinRequest(sdk_version="raw-test"), timeout=5)
            task, layout = _pull_train_task(stub)
            # Act
            with pytest.raises(grpc.RpcError):
                stub.PushResult(iter(_upload(task, layout, float("nan"))), timeout=30)
            stub.Leave(fleet_pb2.LeaveRequest(reason="test done"), timeout=5)
            assert coordinator.wait(timeout_s=60)
            wait_silos([a, b])
    # Assert
    entries = _audit(config)
    joined = {e.identity: e for e in entries if e.kind is AuditKind.JOIN}
    assert set(joined) == {"silo-a", "silo-b", "silo-c"}
    assert all(e.peer.startswith("ipv4:127.0.0.1:") for e in joined.values())
    assert "raw-test" in joined["silo-c"].detail
    (rejected,) = [e for e in entries if e.kind is AuditKind.REJECTED]
    assert rejected.identity == "silo-c" and rejected.peer == joined["silo-c"].peer
    assert "NaN or infinite" in rejected.detail and "round 1" in rejected.detail
    (left,) = [e for e in entries if e.kind is AuditKind.LEAVE and e.identity == "silo-c"]
    assert left.peer == joined["silo-c"].peer and left.detail == "test done"


def test_an_upload_that_ends_short_is_dropped_not_rejected_and_its_silo_is_gone(
    tmp_path, pki, array_client
):
    # Arrange: a cancelled stream can reach the servicer as one that simply ended;
    # silo-c sends the header and one chunk, then closes its side
    config = make_config(
        tmp_path,
        pki.root,
        ARRAYS,
        chunk_bytes=CHUNK,
        min_clients=3,
        min_results=2,
        federated_evaluation=False,
    )
    with Coordinator(config) as coordinator:
        with (
            silo_thread(array_client(delta=1.0), port=coordinator.port, tls=pki.tls("silo-a")) as a,
            silo_thread(array_client(delta=3.0), port=coordinator.port, tls=pki.tls("silo-b")) as b,
            open_channel(f"127.0.0.1:{coordinator.port}", tls=pki.tls("silo-c")) as channel,
        ):
            stub = fleet_pb2_grpc.FleetStub(channel)
            stub.Join(fleet_pb2.JoinRequest(), timeout=5)
            task, layout = _pull_train_task(stub)
            # Act
            with pytest.raises(grpc.RpcError) as caught:
                stub.PushResult(iter(_upload(task, layout, 5.0)[:2]), timeout=30)
            gone = "silo-c" not in coordinator.federation.available()
            assert coordinator.wait(timeout_s=60)
            wait_silos([a, b])
    # Assert
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"broke off after {CHUNK} bytes" in caught.value.details()
    assert gone
    store = Store(config.state_dir)
    outcomes = {silo: outcome for _, silo, outcome, _ in store.participants(1)}
    committed = store.last_committed()
    store.close()
    assert outcomes == {"silo-a": "accepted", "silo-b": "accepted", "silo-c": "dropped"}
    final = read_checkpoint(committed.checkpoint, sha256=committed.sha256).arrays()
    np.testing.assert_array_equal(final["w"], np.full((32, 64), 2.0, np.float32))
