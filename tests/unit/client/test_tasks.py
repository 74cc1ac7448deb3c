"""The silo's checks of a coordinator's task, without sockets."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from fedpriv.client import ClientStats
from fedpriv.client.config import ClientConfig
from fedpriv.client.tasks import DEFAULT_MAX_MODEL_BYTES, TaskLimits, receive_task
from fedpriv.errors import ConfigError, ProtocolError, TaskRejected
from fedpriv.secagg import RingCodec
from fedpriv.secagg.settings import SecAggSettings
from fedpriv.v1 import fleet_pb2, tensor_pb2
from fedpriv.wire import (
    Compression,
    DType,
    Model,
    TensorLayout,
    TensorSpec,
    float32_to_bfloat16,
)
from fedpriv.wire.frames import RawChunk

NOW = 1_700_000_000.0
LIMITS = TaskLimits()


def _task(model: Model | None, **fields: Any) -> fleet_pb2.Task:
    values = {"task_id": "t1", "kind": fleet_pb2.TASK_KIND_TRAIN, "round": 1, **fields}
    header = model.layout.to_proto() if model is not None else None
    return fleet_pb2.Task(model=header, **values)


def _chunks(model: Model) -> list[RawChunk]:
    return [RawChunk(offset, view) for offset, view in model.chunks()]


def _receive(task: fleet_pb2.Task, stream: Any, **kwargs: Any) -> Any:
    options = {"stats": ClientStats(), "limits": LIMITS, "now_unix_s": NOW, **kwargs}
    return receive_task(task, iter(stream), **options)


def test_valid_task_is_received_into_a_buffer_taken_at_the_first_chunk() -> None:
    model = Model.from_arrays({"w": np.arange(40, dtype=np.float32)}, chunk_bytes=64)
    reused = np.full(model.layout.payload_bytes, 7, np.uint8)
    taken: list[int] = []
    stats = ClientStats()

    def take(layout) -> np.ndarray:
        taken.append(layout.payload_bytes)
        return reused

    def stream() -> Iterator[RawChunk]:
        assert not taken  # the header passed; nothing is allocated yet
        for piece in _chunks(model):
            yield piece
            assert taken == [model.layout.payload_bytes]  # taken once, on the first chunk

    received = _receive(_task(model), stream(), take_buffer=take, stats=stats)
    assert received.payload is reused
    np.testing.assert_array_equal(received.payload, model.payload)
    assert stats.bytes_received == model.layout.payload_bytes


@pytest.mark.parametrize("dtype", [DType.FLOAT16, DType.BFLOAT16, DType.FLOAT64])
def test_non_finite_values_of_every_float_type_are_refused(dtype: DType) -> None:
    values = np.array([1.0, np.inf, 2.0, np.nan], np.float32)
    stored = float32_to_bfloat16(values) if dtype is DType.BFLOAT16 else values
    layout = TensorLayout.from_specs([TensorSpec(name="w", dtype=dtype, shape=(4,))])
    model = Model.from_arrays({"w": stored}, layout=layout)
    with pytest.raises(TaskRejected, match=r"NaN or infinite values \(w: 2 in bytes 0"):
        _receive(_task(model), _chunks(model))


def test_integer_tensors_are_not_checked_for_finiteness() -> None:
    model = Model.from_arrays({"n": np.array([-1, 2**40], np.int64)})
    assert _receive(_task(model), _chunks(model)).payload.nbytes == 16


def test_model_larger_than_the_host_memory_is_refused_before_allocating() -> None:
    model = Model.from_arrays({"w": np.zeros(64, np.float32)})
    with pytest.raises(TaskRejected, match="more than this host's 100 bytes of memory"):
        _receive(_task(model), _chunks(model), memory_bytes=100, take_buffer=pytest.fail)


def test_cap_is_a_config_key_with_a_safe_default(tmp_path: pathlib.Path) -> None:
    base = {"coordinator": {"address": "h:1"}}
    assert ClientConfig.from_dict(base, base_dir=tmp_path).limits.max_model_bytes == 4 << 30
    assert DEFAULT_MAX_MODEL_BYTES == 4 << 30
    config = ClientConfig.from_dict({**base, "limits": {"max_model_bytes": 64}}, base_dir=tmp_path)
    model = Model.from_arrays({"w": np.zeros(32, np.float32)})
    with pytest.raises(TaskRejected, match=r"declares 128 bytes.*\(64; raise \[limits\]"):
        _receive(_task(model), _chunks(model), limits=config.limits)
    with pytest.raises(ConfigError, match=r"limits.max_model_bytes = 0: must be a positive"):
        ClientConfig.from_dict({**base, "limits": {"max_model_bytes": 0}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in \[limits\]: max_model"):
        ClientConfig.from_dict({**base, "limits": {"max_model": 1}}, base_dir=tmp_path)


def test_deadline_far_ahead_of_the_silo_clock_is_refused() -> None:
    model = Model.from_arrays({"w": np.zeros(2, np.float32)})
    with pytest.raises(TaskRejected, match="more than 365 days after this silo's clock"):
        _receive(_task(model, deadline_unix_s=NOW + 366 * 86400), _chunks(model))
    # A deadline already past on this clock is the coordinator's to judge (clocks differ).
    assert _receive(_task(model, deadline_unix_s=NOW - 60), _chunks(model)).layout


def test_architecture_problems_name_every_tensor() -> None:
    model = Model.from_arrays({"w": np.zeros((2, 3), np.float32), "extra": np.zeros(1, np.int8)})
    mine = {"w": (3, 2), "bias": (2,)}
    with pytest.raises(TaskRejected) as caught:
        _receive(_task(model), _chunks(model), expected=mine, take_buffer=pytest.fail)
    assert caught.value.problems == (
        "bias: missing (this silo's model has it)",
        "extra: not in this silo's model",
        "w: shape (2, 3) != this silo's model (3, 2)",
    )


def test_problems_listed_in_a_decline_are_bounded() -> None:
    header = tensor_pb2.TensorHeader(
        tensors=[tensor_pb2.TensorSpec(name="n" * 900 + str(i), dtype=99) for i in range(50)],
        chunk_bytes=64,
    )
    task = fleet_pb2.Task(task_id="t1", kind=fleet_pb2.TASK_KIND_TRAIN, round=1, model=header)
    with pytest.raises(TaskRejected) as caught:
        _receive(task, [])
    assert len(caught.value.problems) == 11
    assert caught.value.problems[-1] == "and 40 more problems"
    assert all(len(problem) <= 240 for problem in caught.value.problems)
    assert len(str(caught.value)) < 3000


def test_task_rejected_is_a_protocol_error() -> None:
    assert issubclass(TaskRejected, ProtocolError)
    err = TaskRejected(task_id="t", round=2, problems=["a", "b"])
    assert (err.task_id, err.round, err.problems) == ("t", 2, ("a", "b"))


def test_torch_client_declares_its_model_shapes() -> None:
    torch = pytest.importorskip("torch")
    from fedpriv.client.tasks import ModelOwner
    from fedpriv.client.torch import TorchClient

    client = TorchClient(
        torch.nn.Linear(3, 2),
        train_loader=torch.utils.data.DataLoader([]),
        loss_fn=torch.nn.functional.mse_loss,
        optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1),
        device="cpu",
    )
    assert isinstance(client, ModelOwner)
    assert client.model_shapes() == {"weight": (2, 3), "bias": (2,)}


def test_secure_aggregation_settings_and_compression_arrive_as_typed_fields() -> None:
    model = Model.from_arrays({"w": np.arange(40, dtype=np.float32)}, chunk_bytes=64)
    settings = SecAggSettings(
        session="s" * 32, threshold=2, clip_norm=1.0, scale=1e6, size=40, chunk_bytes=64
    )

    secure = _receive(_task(model, secagg=settings.to_proto()), _chunks(model))
    compressed = _receive(_task(model, compression=fleet_pb2.COMPRESSION_BF16), _chunks(model))
    plain = _receive(_task(model), _chunks(model))

    assert (secure.secagg, secure.compression) == (settings, Compression.NONE)
    assert (compressed.secagg, compressed.compression) == (None, Compression.BF16)
    assert (plain.secagg, plain.compression) == (None, Compression.NONE)


def test_secure_aggregation_settings_are_refused_with_every_problem() -> None:
    model = Model.from_arrays({"w": np.arange(40, dtype=np.float32)}, chunk_bytes=64)
    bad = fleet_pb2.SecAggSettings(session="s", threshold=0, clip_norm=1.0, scale=1.0, size=41)
    task = _task(model, kind=fleet_pb2.TASK_KIND_EVALUATE, secagg=bad, compression=9)

    with pytest.raises(TaskRejected) as rejected:
        _receive(task, _chunks(model))

    problems = rejected.value.problems
    assert any(p.startswith("unknown compression 9") for p in problems)
    assert "secagg.threshold 0 must be in [1, 65535]" in problems
    assert any(p.startswith("secagg.chunk_bytes 0") for p in problems)
    assert any(p.startswith("secagg.ring_bits 0") for p in problems)
    assert "secure-aggregation settings on a task that is not TRAIN" in problems


def test_the_secagg_graph_assumption_is_a_limits_key_with_the_coordinators_defaults(
    tmp_path: pathlib.Path,
) -> None:
    base = {"coordinator": {"address": "h:1"}}
    limits = ClientConfig.from_dict(base, base_dir=tmp_path).limits
    assert (limits.secagg_corrupt_fraction, limits.secagg_security_bits) == (0.05, 40)
    config = ClientConfig.from_dict(
        {**base, "limits": {"secagg_corrupt_fraction": 0.2, "secagg_security_bits": 64}},
        base_dir=tmp_path,
    )
    assert (config.limits.secagg_corrupt_fraction, config.limits.secagg_security_bits) == (0.2, 64)
    assert limits.secagg_min_noise_multiplier == 0.0
    required = ClientConfig.from_dict(
        {**base, "limits": {"secagg_min_noise_multiplier": 1.1}}, base_dir=tmp_path
    )
    assert required.limits.secagg_min_noise_multiplier == 1.1
    with pytest.raises(ConfigError, match=r"limits.secagg_corrupt_fraction = 0.5: must be in"):
        ClientConfig.from_dict(
            {**base, "limits": {"secagg_corrupt_fraction": 0.5}}, base_dir=tmp_path
        )
    with pytest.raises(ConfigError, match=r"limits.secagg_security_bits = 0: must be in"):
        ClientConfig.from_dict({**base, "limits": {"secagg_security_bits": 0}}, base_dir=tmp_path)


def test_a_silo_can_require_distributed_noise_of_the_fewest_survivors() -> None:
    # Any 3 survivors carry noise of multiplier 1 (each silo adds a third of it)
    codec = RingCodec.plan(clip_norm=1.0, size=100, clients=5, threshold=3, noise_multiplier=1.0)
    wary = TaskLimits(secagg_min_noise_multiplier=0.99)
    assert TaskLimits().noise_refusal(codec, survivors=1) is None  # no requirement by default
    assert wary.noise_refusal(codec, survivors=3) is None
    refused = wary.noise_refusal(codec, survivors=2)  # sqrt(2/3) of the noise multiplier
    assert refused is not None and "noise multiplier of 0.816" in refused
    silent = RingCodec.plan(clip_norm=1.0, size=100, clients=5, threshold=3)
    assert "noise multiplier of 0" in (wary.noise_refusal(silent, survivors=5) or "")
    with pytest.raises(ConfigError, match="secagg_min_noise_multiplier = -1"):
        TaskLimits(secagg_min_noise_multiplier=-1.0)
