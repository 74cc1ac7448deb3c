"""A coordinator's malformed task is declined with a reason; the silo lives on and takes the next.

A fake coordinator (a real gRPC server on 127.0.0.1:0) serves one malformed
task, then a valid TRAIN task, then FINISHED. The silo runs the SDK's own run
loop in a thread. For every malformed task it must decline with a reason that
the fake records, never call the client's ``fit`` or ``evaluate`` on it, and
then train on the valid task and leave when told the federation finished.
"""

from __future__ import annotations

import logging
import math
import threading
import tracemalloc
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import psutil
import pytest

from fedpriv.client import ClientStats, run_client
from fedpriv.client.tasks import TaskLimits
from fedpriv.v1 import fleet_pb2, fleet_pb2_grpc, tensor_pb2
from fedpriv.wire import DType, Model, TensorSpec, arrays_from_payload, scalars_to_proto

CHUNK = 64
ARRAYS = {"w": np.arange(64, dtype=np.float32), "b": np.ones(3, np.float32)}
MODEL = Model.from_arrays(ARRAYS, chunk_bytes=CHUNK)  # w: 4 chunks of 64 bytes, b: 12 bytes
TRAIN = fleet_pb2.TASK_KIND_TRAIN
EVALUATE = fleet_pb2.TASK_KIND_EVALUATE


@dataclass
class Recorded:
    header: fleet_pb2.ResultHeader
    payload: bytes


@dataclass
class FakeCoordinator(fleet_pb2_grpc.FleetServicer):
    """Serves scripted PullTask streams in order, then FINISHED; records every result."""

    script: deque[list[fleet_pb2.TaskMessage]]
    results: dict[str, Recorded] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Join(self, request, context):  # noqa: N802
        return fleet_pb2.JoinReply(silo="silo-a", federation="fake", heartbeat_interval_s=1)

    def PullTask(self, request, context):  # noqa: N802
        with self.lock:
            messages = self.script.popleft() if self.script else None
        if messages is None:
            finished = fleet_pb2.Task(kind=fleet_pb2.TASK_KIND_FINISHED)
            messages = [fleet_pb2.TaskMessage(task=finished)]
        yield from messages

    def PushResult(self, request_iterator, context):  # noqa: N802
        header = next(request_iterator).header
        payload = b"".join(bytes(m.chunk.data) for m in request_iterator)
        with self.lock:
            self.results[header.task_id] = Recorded(header, payload)
        return fleet_pb2.PushReply(accepted=not header.declined_reason)

    def Heartbeat(self, request, context):  # noqa: N802
        return fleet_pb2.HeartbeatReply(known=True)

    def Leave(self, request, context):  # noqa: N802
        return fleet_pb2.LeaveReply()


class CountingClient:
    """Adds one to every parameter; counts the calls it gets."""

    def __init__(self, specs: Sequence[TensorSpec] | None = None) -> None:
        self.fits = 0
        self.evaluations = 0
        self._specs = specs

    def fit(self, parameters: Mapping[str, Any], *, config: Mapping[str, Any]) -> Any:
        from fedpriv.client import FitResult

        self.fits += 1
        return FitResult(
            parameters={k: (v + 1).astype(v.dtype) for k, v in parameters.items()},
            num_examples=10,
        )

    def evaluate(self, parameters: Mapping[str, Any], *, config: Mapping[str, Any]) -> Any:
        from fedpriv.client import EvaluateResult

        self.evaluations += 1
        return EvaluateResult(num_examples=10, metrics={"loss": 0.5})


class ModelClient(CountingClient):
    """A client that declares its own model's tensors (as TorchClient does)."""

    def model_shapes(self) -> dict[str, tuple[int, ...]]:
        assert self._specs is not None
        return {spec.name: spec.shape for spec in self._specs}


def task(
    task_id: str,
    *,
    kind: int = TRAIN,
    round: int = 1,
    model: fleet_pb2.TensorHeader | None = None,
    config: Mapping[str, Any] | None = None,
    deadline_unix_s: float = 0.0,
    **fields: Any,
) -> fleet_pb2.TaskMessage:
    return fleet_pb2.TaskMessage(
        task=fleet_pb2.Task(
            task_id=task_id,
            kind=kind,
            round=round,
            config=scalars_to_proto({"round": round} if config is None else config),
            model=model,
            deadline_unix_s=deadline_unix_s,
            **fields,
        )
    )


def secagg_settings(**changes: Any) -> fleet_pb2.SecAggSettings:
    """Valid settings for MODEL (67 elements), with `changes` applied."""
    values: dict[str, Any] = {
        "session": "s" * 32,
        "threshold": 2,
        "clip_norm": 1.0,
        "scale": 1e6,
        "size": 67,
        "chunk_bytes": CHUNK,
        "ring_bits": 32,
    }
    return fleet_pb2.SecAggSettings(**(values | changes))


def chunk(offset: int, data: bytes) -> fleet_pb2.TaskMessage:
    return fleet_pb2.TaskMessage(chunk=tensor_pb2.TensorChunk(offset=offset, data=data))


def model_chunks(model: Model = MODEL, order: Sequence[int] | None = None) -> list[Any]:
    pieces = [chunk(offset, bytes(view)) for offset, view in model.chunks()]
    return pieces if order is None else [pieces[i] for i in order]


def with_model(task_id: str, model: Model = MODEL, **kwargs: Any) -> list[Any]:
    return [task(task_id, model=model.layout.to_proto(), **kwargs), *model_chunks(model)]


def huge_header(payload_bytes: int) -> fleet_pb2.TensorHeader:
    """A well-formed header for one float32 tensor of `payload_bytes` bytes."""
    spec = tensor_pb2.TensorSpec(name="w", dtype=DType.FLOAT32.value, shape=[payload_bytes // 4])
    return tensor_pb2.TensorHeader(tensors=[spec], payload_bytes=payload_bytes, chunk_bytes=2 << 20)


def nan_model() -> Model:
    w = ARRAYS["w"].copy()
    w[5] = np.nan
    return Model.from_arrays({"w": w, "b": np.array([1, np.inf, 1], np.float32)}, chunk_bytes=CHUNK)


def header_with(**changes: Any) -> fleet_pb2.TensorHeader:
    header = MODEL.layout.to_proto()
    for name, value in changes.items():
        if name == "dtype":
            header.tensors[0].dtype = value
        else:
            setattr(header, name, value)
    return header


HEADER = MODEL.layout.to_proto()
LAST = MODEL.layout.payload_bytes
OTHER_SPECS = [
    TensorSpec(name="w", dtype=DType.FLOAT32, shape=(8, 8)),
    TensorSpec(name="b", dtype=DType.FLOAT32, shape=(3,)),
]

# (id, the bad PullTask stream, words the recorded reason must contain)
MALFORMED: list[tuple[str, list[Any], str]] = [
    ("train-without-model", [task("bad")], "carries no model"),
    ("evaluate-without-model", [task("bad", kind=EVALUATE)], "carries no model"),
    (
        "wrong-length-chunk",
        [task("bad", model=HEADER), chunk(0, bytes(CHUNK - 8))],
        "chunk at offset 0 with 56 bytes",
    ),
    ("header-without-chunks", [task("bad", model=HEADER)], "stream ended after 0 of 268"),
    ("unknown-kind", with_model("bad", kind=7), "unknown task kind 7"),
    ("unspecified-kind", with_model("bad", kind=0), "unknown task kind 0"),
    (
        "declares-1-tib",
        [task("bad", model=huge_header(1 << 40)), chunk(0, bytes(2 << 20))],
        "1099511627776 bytes",
    ),
    (
        "declares-16-gib",
        [task("bad", model=huge_header(16 << 30)), chunk(0, bytes(2 << 20))],
        "17179869184 bytes",
    ),
    ("nan-model", with_model("bad", model=nan_model()), "NaN or infinite"),
    (
        "missing-chunk",
        [task("bad", model=HEADER), *model_chunks(order=[0, 1, 3, 4])],
        "chunk at offset 192",
    ),
    (
        "missing-last-chunk",
        [task("bad", model=HEADER), *model_chunks(order=[0, 1, 2, 3])],
        "stream ended after 256 of 268",
    ),
    (
        "extra-chunk",
        [*with_model("bad"), chunk(LAST, bytes(8))],
        "after the model's last byte",
    ),
    (
        "out-of-order-chunks",
        [task("bad", model=HEADER), *model_chunks(order=[1, 0, 2, 3, 4])],
        "chunk at offset 64",
    ),
    (
        "duplicate-chunk",
        [task("bad", model=HEADER), *model_chunks(order=[0, 0, 1, 2, 3, 4])],
        "chunk at offset 0",
    ),
    (
        "task-among-chunks",
        [task("bad", model=HEADER), *model_chunks(order=[0]), task("other", model=HEADER)],
        "only the model's chunks may follow",
    ),
    ("unknown-dtype", [task("bad", model=header_with(dtype=42))], "unknown dtype 42"),
    ("payload-mismatch", [task("bad", model=header_with(payload_bytes=4))], "payload_bytes 4"),
    ("zero-chunk-bytes", [task("bad", model=header_with(chunk_bytes=0))], "chunk_bytes 0"),
    ("nan-deadline", with_model("bad", deadline_unix_s=math.nan), "deadline_unix_s"),
    ("negative-deadline", with_model("bad", deadline_unix_s=-5.0), "deadline_unix_s"),
    ("round-zero", with_model("bad", round=0, config={}), "round 0"),
    ("config-round-differs", with_model("bad", config={"round": 2}), "config round 2"),
    ("unknown-compression", with_model("bad", compression=7), "unknown compression 7"),
    (
        "secagg-bad-values",
        with_model("bad", secagg=secagg_settings(threshold=0, clip_norm=math.nan)),
        "secagg.threshold 0 must be in [1, 65535]; secagg.clip_norm nan must be a finite number > 0",
    ),
    ("secagg-no-session", with_model("bad", secagg=secagg_settings(session="")), "session"),
    ("secagg-ring-bits", with_model("bad", secagg=secagg_settings(ring_bits=64)), "ring_bits 64"),
    (
        "secagg-chunk-bytes",
        with_model("bad", secagg=secagg_settings(chunk_bytes=12)),
        "chunk_bytes 12",
    ),
    (
        "secagg-size-differs",
        with_model("bad", secagg=secagg_settings(size=10)),
        "secure-aggregation size 10 != the model's 67 elements",
    ),
    (
        "secagg-on-evaluate",
        with_model("bad", kind=EVALUATE, secagg=secagg_settings()),
        "not TRAIN",
    ),
    (
        "secagg-compressed",
        with_model("bad", secagg=secagg_settings(), compression=fleet_pb2.COMPRESSION_INT8),
        "never compressed",
    ),
    ("nan-config", with_model("bad", config={"round": 1, "lr": math.nan}), "'lr'"),
    ("overlong-task-id", with_model("x" * 300), "task_id"),
]


@dataclass
class Federation:
    fake: FakeCoordinator
    client: CountingClient
    stats: ClientStats | None
    error: BaseException | None


def run_silo(
    script: list[list[Any]],
    client: CountingClient | None = None,
    *,
    limits: TaskLimits | None = None,
) -> Federation:
    fake = FakeCoordinator(script=deque(script))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    fleet_pb2_grpc.add_FleetServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = client or CountingClient()
    outcome: dict[str, Any] = {}

    def silo() -> None:
        try:
            outcome["stats"] = run_client(
                client,
                coordinator=f"127.0.0.1:{port}",
                tls=None,
                insecure=True,
                identity="silo-a",
                poll_wait_s=1,
                reconnect_timeout_s=10,
                limits=limits,
            )
        except BaseException as err:  # recorded for the test to assert on
            outcome["error"] = err

    thread = threading.Thread(target=silo, daemon=True)
    try:
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), "the silo did not finish"
    finally:
        server.stop(None).wait()
    return Federation(fake, client, outcome.get("stats"), outcome.get("error"))


def assert_declined_then_trained(federation: Federation, bad_id: str, words: str) -> None:
    assert federation.error is None, f"the silo died: {federation.error!r}"
    results = federation.fake.results
    assert bad_id in results, "the malformed task was not declined"
    declined = results[bad_id].header
    assert words in declined.declined_reason, declined.declined_reason
    assert not results[bad_id].payload
    good = results["good"].header
    assert not good.declined_reason and good.round == 1
    update = arrays_from_payload(MODEL.layout, np.frombuffer(results["good"].payload, np.uint8))
    np.testing.assert_array_equal(update["w"], ARRAYS["w"] + 1)
    # The malformed task never reached the client's code.
    assert federation.client.fits == 1 and federation.client.evaluations == 0
    assert federation.stats is not None
    assert (federation.stats.declined, federation.stats.trained) == (1, 1)


@pytest.mark.parametrize(
    ("bad", "words"),
    [pytest.param(bad, words, id=name) for name, bad, words in MALFORMED],
)
def test_malformed_task_is_declined_and_the_silo_takes_the_next(
    bad: list[Any], words: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Arrange
    bad_id = bad[0].task.task_id
    script = [bad, with_model("good")]
    # Act
    with caplog.at_level(logging.WARNING):
        federation = run_silo(script)
    # Assert
    assert_declined_then_trained(federation, bad_id, words)
    refusals = [
        r for r in caplog.records if r.name.startswith("fedpriv.client") and "refused" in r.message
    ]
    assert [r.levelno for r in refusals] == [logging.WARNING], caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.parametrize(
    "declared_bytes",
    [pytest.param(1 << 40, id="1-tib"), pytest.param(16 << 30, id="16-gib")],
)
def test_huge_model_declaration_allocates_nothing(declared_bytes: int) -> None:
    # Arrange
    script = [
        [task("bad", model=huge_header(declared_bytes)), chunk(0, bytes(2 << 20))],
        with_model("good"),
    ]
    rss_before = psutil.Process().memory_info().rss
    tracemalloc.start()
    # Act
    try:
        federation = run_silo(script)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Assert
    assert_declined_then_trained(federation, "bad", str(declared_bytes))
    assert "max_model_bytes" in federation.fake.results["bad"].header.declined_reason
    # Nothing near the declared size was ever allocated (numpy reports to tracemalloc).
    assert peak_bytes < 64 << 20, peak_bytes
    assert psutil.Process().memory_info().rss - rss_before < 256 << 20


def test_declaration_under_the_cap_is_allocated_only_as_chunks_arrive() -> None:
    # Arrange: 1 GiB is allowed here, but the coordinator sends no chunk of it.
    script = [[task("bad", model=huge_header(1 << 30))], with_model("good")]
    tracemalloc.start()
    # Act
    try:
        federation = run_silo(script, limits=TaskLimits(max_model_bytes=2 << 30))
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Assert
    assert_declined_then_trained(federation, "bad", "stream ended after 0 of 1073741824")
    assert peak_bytes < 64 << 20, peak_bytes


def test_model_that_does_not_fit_the_silo_architecture_is_declined() -> None:
    client = ModelClient(specs=OTHER_SPECS)
    mismatch = [task("bad", model=HEADER)]  # refused from the header: no chunk needed
    good_for_it = Model.from_arrays(
        {"w": np.zeros((8, 8), np.float32), "b": np.ones(3, np.float32)}, chunk_bytes=CHUNK
    )
    federation = run_silo([mismatch, with_model("good", model=good_for_it)], client)
    assert federation.error is None, federation.error
    reason = federation.fake.results["bad"].header.declined_reason
    assert "w: shape (64,) != this silo's model (8, 8)" in reason, reason
    assert not federation.fake.results["good"].header.declined_reason
    assert client.fits == 1


def test_every_problem_of_a_task_is_listed_in_one_decline() -> None:
    bad = [
        task("bad", kind=7, round=0, config={"round": 3}, deadline_unix_s=math.inf, model=HEADER)
    ]
    federation = run_silo([bad, with_model("good")])
    reason = federation.fake.results["bad"].header.declined_reason
    for words in ("unknown task kind 7", "round 0", "config round 3", "deadline_unix_s"):
        assert words in reason, reason


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param([], id="empty-stream"),
        pytest.param([chunk(0, bytes(8))], id="chunk-before-task"),
    ],
)
def test_stream_without_a_task_is_skipped_and_the_silo_polls_again(
    stream: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        federation = run_silo([stream, with_model("good")])
    assert federation.error is None, federation.error
    assert list(federation.fake.results) == ["good"]
    assert federation.client.fits == 1
    assert any(
        r.levelno == logging.WARNING and "did not start with a Task" in r.message
        for r in caplog.records
    ), caplog.text


def test_wait_task_with_a_model_is_not_downloaded(caplog: pytest.LogCaptureFixture) -> None:
    wait = [task("", kind=fleet_pb2.TASK_KIND_WAIT, model=huge_header(1 << 40))]
    with caplog.at_level(logging.WARNING):
        federation = run_silo([wait, with_model("good")])
    assert federation.error is None, federation.error
    assert list(federation.fake.results) == ["good"]
    assert "WAIT task carries a model" in caplog.text
