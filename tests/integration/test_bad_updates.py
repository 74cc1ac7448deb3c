"""Malformed updates are rejected with a clear status; the round completes with the others."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from fedpriv.coordinator import Coordinator, Store
from fedpriv.transport import open_channel
from fedpriv.v1 import fleet_pb2, fleet_pb2_grpc, tensor_pb2
from fedpriv.wire import (
    DType,
    PayloadAssembler,
    TensorLayout,
    encode_chunks,
    layout_from_proto,
    specs_from_arrays,
)
from tests.helpers import CollectingReporter, make_config, silo_thread, wait_silos

CHUNK = 64 << 10
ARRAYS = {"w": np.zeros((512, 512), np.float32), "b": np.zeros(512, np.float32)}


def _pull_train_task(stub):
    while True:
        messages = list(stub.PullTask(fleet_pb2.PullTaskRequest(wait_s=2), timeout=30))
        task = messages[0].task
        if task.kind == fleet_pb2.TASK_KIND_TRAIN:
            layout, problems = layout_from_proto(task.model)
            assembler = PayloadAssembler(layout)
            for m in messages[1:]:
                assembler.add(m.chunk.offset, m.chunk.data)
            return task, layout, assembler.finish()


def _push(stub, task, layout: TensorLayout, arrays, *, round=None, header_layout=None):
    header = fleet_pb2.ResultHeader(
        task_id=task.task_id,
        round=task.round if round is None else round,
        kind=task.kind,
        num_examples=5,
        update=(header_layout or layout).to_proto(),
    )

    def messages():
        yield fleet_pb2.ResultMessage(header=header)
        for offset, data in encode_chunks(layout, arrays):
            yield fleet_pb2.ResultMessage(chunk=tensor_pb2.TensorChunk(offset=offset, data=data))

    return stub.PushResult(messages(), timeout=30)


def _layout_with(name: str, dtype: DType, shape) -> TensorLayout:
    specs = [
        s if s.name != name else type(s)(name=name, dtype=dtype, shape=shape)
        for s in specs_from_arrays(ARRAYS)
    ]
    return TensorLayout.from_specs(specs, chunk_bytes=CHUNK)


def _nan_in_last_chunk():
    bad = {k: np.full_like(v, 7.0) for k, v in ARRAYS.items()}
    bad["w"][-1, -1] = np.nan
    bad["w"][-1, -3] = np.inf
    return bad


CASES = {
    "wrong_shape": (
        lambda: (
            _layout_with("w", DType.FLOAT32, (512, 256)),
            {"w": np.ones((512, 256), np.float32), "b": np.ones(512, np.float32)},
        ),
        ["w: shape (512, 256) != expected (512, 512)"],
        "layout",
    ),
    "wrong_dtype": (
        lambda: (
            _layout_with("b", DType.FLOAT64, (512,)),
            {"w": np.ones((512, 512), np.float32), "b": np.ones(512)},
        ),
        ["b: dtype float64 != expected float32"],
        "layout",
    ),
    "nan_and_inf": (
        lambda: (
            TensorLayout.from_specs(specs_from_arrays(ARRAYS), chunk_bytes=CHUNK),
            _nan_in_last_chunk(),
        ),
        ["w: 2 NaN or infinite values"],
        "non_finite",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_update_is_rejected_and_round_completes_with_other_silos(
    case, tmp_path, pki, array_client
):
    # Arrange: three silos must connect; two valid results are enough to finish
    make_bad, expected_problems, expected_reason = CASES[case]
    config = make_config(
        tmp_path,
        pki.root,
        ARRAYS,
        chunk_bytes=CHUNK,
        num_rounds=1,
        min_clients=3,
        min_results=2,
        federated_evaluation=False,
    )
    reporter = CollectingReporter()
    with Coordinator(config, reporter=reporter) as coordinator:
        with (
            silo_thread(array_client(delta=1.0), port=coordinator.port, tls=pki.tls("silo-a")) as a,
            silo_thread(array_client(delta=3.0), port=coordinator.port, tls=pki.tls("silo-b")) as b,
            open_channel(f"127.0.0.1:{coordinator.port}", tls=pki.tls("silo-c")) as channel,
        ):
            stub = fleet_pb2_grpc.FleetStub(channel)
            stub.Join(fleet_pb2.JoinRequest(), timeout=5)
            task, layout, _ = _pull_train_task(stub)
            bad_layout, bad_arrays = make_bad()
            # Act
            with pytest.raises(grpc.RpcError) as caught:
                _push(stub, task, bad_layout, bad_arrays)
            stub.Leave(fleet_pb2.LeaveRequest(reason="test done"), timeout=5)
            assert coordinator.wait(timeout_s=60)
            wait_silos([a, b])
        final = coordinator.federation.model.arrays()
        rejections = coordinator.telemetry.registry.get_sample_value(
            "fedpriv_rejections_total", {"reason": expected_reason}
        )
    # Assert: a clear INVALID_ARGUMENT naming every problem...
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for problem in expected_problems:
        assert problem in caught.value.details()
    assert "silo-c" in caught.value.details() and "round 1" in caught.value.details()
    # ...and the round completed with the two good silos only (mean of +1 and +3).
    assert reporter.completed[0].accepted == 2 and reporter.completed[0].rejected == 1
    np.testing.assert_array_equal(final["w"], np.full((512, 512), 2.0, np.float32))
    store = Store(config.state_dir)
    outcomes = {(silo, outcome) for _, silo, outcome, _ in store.participants(1)}
    store.close()
    assert ("silo-c", "rejected") in outcomes
    # ...counted by reason for Prometheus and logged in the run's JSONL.
    assert rejections == 1.0
    events = [
        json.loads(line) for line in (config.state_dir / "metrics.jsonl").read_text().splitlines()
    ]
    (rejected,) = [e for e in events if e["event"] == "update_rejected"]
    assert rejected["silo"] == "silo-c" and rejected["reason"] == expected_reason
    assert expected_problems[0] in rejected["detail"]


def test_update_for_wrong_round_is_rejected(tmp_path, pki, array_client):
    config = make_config(
        tmp_path,
        pki.root,
        ARRAYS,
        chunk_bytes=CHUNK,
        num_rounds=1,
        min_clients=3,
        min_results=2,
        federated_evaluation=False,
    )
    with Coordinator(config) as coordinator:
        with (
            silo_thread(array_client(), port=coordinator.port, tls=pki.tls("silo-a")) as a,
            silo_thread(array_client(), port=coordinator.port, tls=pki.tls("silo-b")) as b,
            open_channel(f"127.0.0.1:{coordinator.port}", tls=pki.tls("silo-c")) as channel,
        ):
            stub = fleet_pb2_grpc.FleetStub(channel)
            stub.Join(fleet_pb2.JoinRequest(), timeout=5)
            task, layout, payload = _pull_train_task(stub)
            with pytest.raises(grpc.RpcError) as caught:
                _push(
                    stub,
                    task,
                    layout,
                    {k: v.copy() for k, v in ARRAYS.items()},
                    round=task.round + 1,
                )
            # The same task again (a replay) is refused: the silo already has an outcome.
            with pytest.raises(grpc.RpcError) as replay:
                _push(stub, task, layout, {k: v.copy() for k, v in ARRAYS.items()})
            stub.Leave(fleet_pb2.LeaveRequest(reason="test done"), timeout=5)
            assert coordinator.wait(timeout_s=60)
            wait_silos([a, b])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "round 2 != 1" in caught.value.details()
    assert replay.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_upload_from_silo_without_task_is_refused(tmp_path, pki):
    config = make_config(tmp_path, pki.root, ARRAYS, chunk_bytes=CHUNK)
    with (
        Coordinator(config) as coordinator,
        open_channel(f"127.0.0.1:{coordinator.port}", tls=pki.tls("silo-d")) as channel,
    ):
        stub = fleet_pb2_grpc.FleetStub(channel)
        forged = fleet_pb2.Task(task_id="forged", round=1, kind=fleet_pb2.TASK_KIND_TRAIN)
        layout = TensorLayout.from_specs(specs_from_arrays(ARRAYS), chunk_bytes=CHUNK)
        with pytest.raises(grpc.RpcError) as caught:
            _push(stub, forged, layout, ARRAYS)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no open task" in caught.value.details()
