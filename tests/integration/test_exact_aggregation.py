"""One silo cannot wipe or overflow the honest silos' aggregate, with or without central DP.

The attacker is a raw gRPC stream under its own certificate. Whatever it sends,
the committed checkpoint must equal the FedAvg of the two honest silos (their
clipped, equally weighted mean under DP), computed here with numpy.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from fedpriv.coordinator import Coordinator, Store, read_checkpoint
from fedpriv.coordinator import upload as upload_module
from fedpriv.privacy.central import CentralDP
from fedpriv.transport import open_channel
from fedpriv.v1 import fleet_pb2, fleet_pb2_grpc, tensor_pb2
from fedpriv.wire import Model, PayloadAssembler, TensorLayout, layout_from_proto
from tests.helpers import CollectingReporter, make_config, silo_thread, wait_silos

CHUNK = 4096
ATTACKER = "silo-c"
HONEST = ((1.0, 10), (3.0, 30))  # (delta, num_examples) of silo-a and silo-b
CLIP_NORM = 100.0  # silo-b's update (norm 3 * sqrt(4160) = 193) is clipped, silo-a's is not
# z C / m = 5e-5 per element on the mean of 2: far below the attacks' effect (>= 1).
DP = CentralDP(noise_multiplier=1e-6, clip_norm=CLIP_NORM, expected_clients=3)
DP_TOLERANCE = 5e-4


def _initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "w": rng.normal(size=(64, 64)).astype(np.float32),
        "b": rng.normal(size=64).astype(np.float32),
    }


def _honest_fedavg(initial: dict[str, np.ndarray], *, dp: bool) -> dict[str, np.ndarray]:
    """FedAvg of the honest silos in float64 (clipped to C and unweighted under DP)."""
    names = list(initial)
    flat = np.concatenate([initial[n].ravel().astype(np.float64) for n in names])
    deltas, weights = [], []
    for delta, num_examples in HONEST:
        update = np.concatenate([(initial[n] + delta).astype(np.float32).ravel() for n in names])
        difference = update.astype(np.float64) - flat
        if dp:
            difference *= min(1.0, CLIP_NORM / float(np.linalg.norm(difference)))
        deltas.append(difference)
        weights.append(1.0 if dp else float(num_examples))
    mean = flat + np.average(np.stack(deltas), axis=0, weights=weights)
    out, position = {}, 0
    for name in names:
        size = initial[name].size
        out[name] = mean[position : position + size].reshape(initial[name].shape)
        position += size
    return out


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


def _chunks(layout: TensorLayout, value: float) -> list[tuple[int, bytes]]:
    arrays = {s.name: np.full(s.shape, value, np.float32) for s in layout.specs}
    return [(o, bytes(c)) for o, c in Model.from_arrays(arrays, layout=layout).chunks()]


def _message(offset: int, data: bytes) -> fleet_pb2.ResultMessage:
    return fleet_pb2.ResultMessage(chunk=tensor_pb2.TensorChunk(offset=offset, data=data))


def _header(task, layout: TensorLayout, num_examples: int) -> fleet_pb2.ResultMessage:
    return fleet_pb2.ResultMessage(
        header=fleet_pb2.ResultHeader(
            task_id=task.task_id,
            round=task.round,
            kind=task.kind,
            num_examples=num_examples,
            update=layout.to_proto(),
        )
    )


def _wait_until_honest_accepted(coordinator: Coordinator) -> None:
    """Block until silo-a and silo-b are both accepted (notified on every outcome)."""
    federation = coordinator.federation

    def honest_accepted() -> bool:
        outcomes = {s.name: s.round_outcome for s in federation.status().silos}
        return outcomes.get("silo-a") == outcomes.get("silo-b") == "accepted"

    with federation.cond:  # the federation notifies it on every upload's outcome
        assert federation.cond.wait_for(honest_accepted, timeout=60)


@pytest.fixture
def attacker_chunk_seen(monkeypatch) -> threading.Event:
    """Set once the coordinator has taken in the attacker's first chunk."""
    seen = threading.Event()
    original = upload_module.Upload.add_chunk

    def add_chunk(self, offset, data):
        original(self, offset, data)
        if self.silo == ATTACKER:
            seen.set()

    monkeypatch.setattr(upload_module.Upload, "add_chunk", add_chunk)
    return seen


def _run(tmp_path, pki, array_client, *, dp: bool, attack, **rounds):
    """Two honest silos and the attacker in one round; returns (reporter, committed, store)."""
    initial = _initial()
    config = make_config(
        tmp_path,
        pki.root,
        initial,
        chunk_bytes=CHUNK,
        num_rounds=1,
        min_clients=3,
        min_results=2,
        federated_evaluation=False,
        dp=DP if dp else None,
        **rounds,
    )
    reporter = CollectingReporter()
    with Coordinator(config, reporter=reporter) as coordinator:
        clients = [array_client(delta=d, num_examples=n) for d, n in HONEST]
        with (
            silo_thread(clients[0], port=coordinator.port, tls=pki.tls("silo-a")) as a,
            silo_thread(clients[1], port=coordinator.port, tls=pki.tls("silo-b")) as b,
            open_channel(f"127.0.0.1:{coordinator.port}", tls=pki.tls(ATTACKER)) as channel,
        ):
            stub = fleet_pb2_grpc.FleetStub(channel)
            stub.Join(fleet_pb2.JoinRequest(), timeout=5)
            task, layout = _pull_train_task(stub)
            status = attack(coordinator, stub, task, layout)
            # Gone, so the coordinator need not wait for it to hear FINISHED.
            stub.Leave(fleet_pb2.LeaveRequest(reason="attack done"), timeout=5)
            assert coordinator.wait(timeout_s=60)
            wait_silos([a, b])
        rejections = {
            reason: coordinator.telemetry.registry.get_sample_value(
                "fedpriv_rejections_total", {"reason": reason}
            )
            for reason in ("bounds", "non_finite", "stream")
        }
    store = Store(config.state_dir)
    committed = store.last_committed()
    outcomes = {silo: outcome for _, silo, outcome, _ in store.participants(1)}
    store.close()
    assert committed is not None and committed.round == 1
    final = read_checkpoint(committed.checkpoint, sha256=committed.sha256).arrays()
    return reporter, final, initial, status, outcomes, rejections


def _assert_honest_fedavg(final, initial, *, dp: bool) -> None:
    expected = _honest_fedavg(initial, dp=dp)
    for name, values in final.items():
        assert np.isfinite(values).all()
        if dp:
            np.testing.assert_allclose(values, expected[name], rtol=0, atol=DP_TOLERANCE)
        else:  # float32 rounding of the honest-only weighted sum
            np.testing.assert_allclose(values, expected[name], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dp", [False, True], ids=["fedavg", "central_dp"])
def test_huge_chunk_then_nan_leaves_the_honest_fedavg(
    dp, tmp_path, pki, array_client, attacker_chunk_seen
):
    # Arrange: the attacker streams a chunk of 1e30, waits until both honest silos
    # are summed, then sends a NaN chunk and the rest (a rejected update).
    def attack(coordinator, stub, task, layout):
        huge, nan = _chunks(layout, 1e30), _chunks(layout, float("nan"))

        def messages() -> Iterator[fleet_pb2.ResultMessage]:
            yield _header(task, layout, num_examples=10)
            yield _message(*huge[0])
            assert attacker_chunk_seen.wait(60)
            _wait_until_honest_accepted(coordinator)
            for chunk in nan[1:]:
                yield _message(*chunk)

        with pytest.raises(grpc.RpcError) as caught:
            stub.PushResult(messages(), timeout=60)
        return caught.value.code()

    # Act
    reporter, final, initial, status, outcomes, rejections = _run(
        tmp_path, pki, array_client, dp=dp, attack=attack
    )
    # Assert: refused, counted as rejected, and without a trace in the model
    assert status == grpc.StatusCode.INVALID_ARGUMENT
    assert outcomes == {"silo-a": "accepted", "silo-b": "accepted", ATTACKER: "rejected"}
    assert reporter.completed[0].accepted == 2 and reporter.completed[0].rejected == 1
    assert rejections["non_finite"] == 1.0
    _assert_honest_fedavg(final, initial, dp=dp)


@pytest.mark.parametrize("dp", [False, True], ids=["fedavg", "central_dp"])
def test_huge_chunk_then_cancel_leaves_the_honest_fedavg(
    dp, tmp_path, pki, array_client, attacker_chunk_seen
):
    # Arrange: the attacker streams a chunk of 1e30, waits until both honest silos
    # are summed, then cancels its stream (a dropped upload).
    def attack(coordinator, stub, task, layout):
        huge = _chunks(layout, 1e30)
        release = threading.Event()

        def messages() -> Iterator[fleet_pb2.ResultMessage]:
            yield _header(task, layout, num_examples=10)
            yield _message(*huge[0])
            release.wait(60)

        call = stub.PushResult.future(messages(), timeout=60)
        assert attacker_chunk_seen.wait(60)
        _wait_until_honest_accepted(coordinator)
        call.cancel()
        release.set()
        with pytest.raises(grpc.FutureCancelledError):
            call.result()
        return grpc.StatusCode.CANCELLED

    # Act
    reporter, final, initial, _, outcomes, _ = _run(
        tmp_path, pki, array_client, dp=dp, attack=attack
    )
    # Assert
    assert outcomes == {"silo-a": "accepted", "silo-b": "accepted", ATTACKER: "dropped"}
    assert reporter.completed[0].accepted == 2
    _assert_honest_fedavg(final, initial, dp=dp)


def _overflow(coordinator, stub, task, layout):
    """Every value 3e38 (finite) with num_examples = 1000: the weighted sum overflows."""
    chunks = _chunks(layout, 3e38)
    messages = [_header(task, layout, num_examples=1000)] + [_message(*c) for c in chunks]
    try:
        stub.PushResult(iter(messages), timeout=60)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("dp", [False, True], ids=["fedavg", "central_dp"])
def test_finite_update_that_would_overflow_the_sum_is_rejected_by_the_value_bound(
    dp, tmp_path, pki, array_client
):
    # Act
    reporter, final, initial, status, outcomes, rejections = _run(
        tmp_path, pki, array_client, dp=dp, attack=_overflow
    )
    # Assert: refused with the bound's reason; the model is the honest silos' mean
    assert status == grpc.StatusCode.INVALID_ARGUMENT
    assert outcomes[ATTACKER] == "rejected"
    assert rejections["bounds"] == 1.0
    _assert_honest_fedavg(final, initial, dp=dp)


def test_a_non_finite_aggregate_fails_the_attempt_and_publishes_nothing(
    tmp_path, pki, array_client
):
    # Arrange: the value bound is off (float32's largest value), so only the check
    # before the commit stands between the overflowing sum and the checkpoint. On
    # the second attempt the attacker declines its task.
    attempts = []

    def attack(coordinator, stub, task, layout):
        status = _overflow(coordinator, stub, task, layout)
        attempts.append(status)
        second, _ = _pull_train_task(stub)
        stub.PushResult(
            iter(
                [
                    fleet_pb2.ResultMessage(
                        header=fleet_pb2.ResultHeader(
                            task_id=second.task_id,
                            round=second.round,
                            kind=second.kind,
                            declined_reason="declining the retried round",
                        )
                    )
                ]
            ),
            timeout=30,
        )
        return status

    # Act
    reporter, final, initial, status, _, _ = _run(
        tmp_path,
        pki,
        array_client,
        dp=False,
        attack=attack,
        max_update_value=float(np.finfo(np.float32).max),
        max_failed_attempts=2,
    )
    # Assert: the first attempt was accepted upload by upload and failed as a whole
    assert status == grpc.StatusCode.OK
    ((round, reason),) = reporter.failed
    assert round == 1
    assert "the aggregate is not finite" in reason and "no model is published" in reason
    assert len(reporter.completed) == 1 and reporter.completed[0].declined == 1
    _assert_honest_fedavg(final, initial, dp=False)


def test_a_weight_above_max_num_examples_is_rejected(tmp_path, pki, array_client):
    # Arrange: a plausible update that claims one example more than the cap
    def attack(coordinator, stub, task, layout):
        messages = [_header(task, layout, num_examples=1001)]
        messages += [_message(*c) for c in _chunks(layout, 0.5)]
        with pytest.raises(grpc.RpcError) as caught:
            stub.PushResult(iter(messages), timeout=60)
        return caught.value

    # Act
    reporter, final, initial, error, outcomes, _ = _run(
        tmp_path, pki, array_client, dp=False, attack=attack, max_num_examples=1000
    )
    # Assert
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "num_examples 1001 must be in [1, 1000] (rounds.max_num_examples)" in error.details()
    assert outcomes[ATTACKER] == "rejected"
    _assert_honest_fedavg(final, initial, dp=False)
