"""Under DP nothing un-noised leaves a silo: every byte it sends is recorded and decoded.

The coordinator's view is the attacker's: a plain-text proxy on 127.0.0.1 records
every byte a silo sends over a real gRPC channel, and the test reassembles the
HTTP/2 DATA frames into gRPC messages and decodes each result header.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest
import torch
from flwr.client import NumPyClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpriv.client import run_client
from fedpriv.client.flower import FlowerClientAdapter
from fedpriv.client.torch import TorchClient
from fedpriv.coordinator import Coordinator
from fedpriv.privacy.accounting import GaussianSteps
from fedpriv.privacy.ledger import PrivacyBudget, PrivacyLedger
from fedpriv.privacy.local import GradSampleMode, LocalDP
from fedpriv.v1 import fleet_pb2
from tests.helpers import make_config
from tests.integration.test_no_raw_data import RecordingProxy, http2_data_streams

TRAIN_SIZE = 137  # odd on purpose: the exact count is easy to tell apart from any default
VAL_SIZE = 41
ACCOUNTING = {"epsilon", "epsilon_rdp", "delta", "noise_multiplier"}
ARRAYS = {"w": np.zeros((16, 4), np.float32), "b": np.zeros(4, np.float32)}


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(16, 4))
        self.b = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + self.b


def private_torch_client() -> TorchClient:
    generator = torch.Generator().manual_seed(3)
    data = TensorDataset(
        torch.randn(TRAIN_SIZE + VAL_SIZE, 16, generator=generator),
        torch.randint(0, 4, (TRAIN_SIZE + VAL_SIZE,), generator=generator),
    )
    train = torch.utils.data.Subset(data, range(TRAIN_SIZE))
    val = torch.utils.data.Subset(data, range(TRAIN_SIZE, TRAIN_SIZE + VAL_SIZE))
    return TorchClient(
        Linear(),
        train_loader=DataLoader(train, batch_size=25),
        val_loader=DataLoader(val, batch_size=64),
        loss_fn=nn.functional.cross_entropy,
        optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1),
        privacy=LocalDP(noise_multiplier=1.5, grad_sample_mode=GradSampleMode.FUNCTORCH),
        device="cpu",
    )


class DPFlowerClient(NumPyClient):
    """A Flower client that trains with its own DP and reports a private statistic."""

    def get_parameters(self, config):
        return []

    def fit(self, parameters, config):
        metrics = {"train_loss": 0.4321, "worst_record_loss": 7.25}
        return [p + np.float32(0.01) for p in parameters], TRAIN_SIZE, metrics

    def evaluate(self, parameters, config):
        return 0.5, VAL_SIZE, {"accuracy": 0.75}


class PrivateFlowerAdapter(FlowerClientAdapter):
    """The adapter with the mechanism the Flower client's own DP-SGD runs declared."""

    def plan_privacy(self, config: Mapping[str, Any]) -> GaussianSteps:
        return GaussianSteps(noise_multiplier=1.5, sample_rate=0.2, steps=5)


def grpc_messages(stream: bytes) -> Iterator[bytes]:
    """Split one HTTP/2 stream's DATA into gRPC length-prefixed messages."""
    position = 0
    while position + 5 <= len(stream):
        assert stream[position] == 0, "compressed gRPC message"
        length = int.from_bytes(stream[position + 1 : position + 5], "big")
        yield stream[position + 5 : position + 5 + length]
        position += 5 + length
    assert position == len(stream), "stream ends inside a gRPC message"


def result_headers(raw: list[bytes]) -> list[fleet_pb2.ResultHeader]:
    """Every ResultHeader in the recording (the first message of each PushResult)."""
    headers = []
    for connection in raw:
        for stream in http2_data_streams(connection).values():
            for message in grpc_messages(stream):
                try:
                    parsed = fleet_pb2.ResultMessage.FromString(message)
                except Exception:  # another RPC's request: not a result
                    continue
                header = parsed.header
                if (
                    parsed.WhichOneof("part") == "header"
                    and header.task_id
                    and header.kind in (fleet_pb2.TASK_KIND_TRAIN, fleet_pb2.TASK_KIND_EVALUATE)
                ):
                    headers.append(header)
    return headers


def recorded_federation(tmp_path, client, **run_kwargs) -> tuple[list[bytes], Any]:
    """One round (train + evaluate) of one DP silo with a ledger, recorded at the wire."""
    config = make_config(tmp_path, None, ARRAYS, num_rounds=1, min_clients=1)
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", budget=PrivacyBudget(epsilon=100.0))
    outcome: dict[str, Any] = {}
    stop = threading.Event()
    with Coordinator(config, insecure=True) as coordinator:
        proxy = RecordingProxy(coordinator.port)

        def silo() -> None:
            try:
                outcome["stats"] = run_client(
                    client,
                    coordinator=f"127.0.0.1:{proxy.port}",
                    tls=None,
                    insecure=True,
                    identity="silo-a",
                    poll_wait_s=2,
                    reconnect_timeout_s=30,
                    stop=stop,
                    ledger=ledger,
                    **run_kwargs,
                )
            except Exception as err:  # reported by the assertion below
                outcome["error"] = err

        thread = threading.Thread(target=silo, daemon=True)
        thread.start()
        try:
            assert coordinator.wait(timeout_s=120)
        finally:
            stop.set()
            thread.join(60)
        proxy.close()
    assert "error" not in outcome, outcome.get("error")
    return [bytes(c) for c in proxy.connections], outcome["stats"]


def test_dp_silo_sends_no_metric_and_no_exact_count_by_default(tmp_path):
    # Arrange
    torch.set_num_threads(1)
    client = private_torch_client()
    # Act
    raw, stats = recorded_federation(tmp_path, client)
    headers = result_headers(raw)
    # Assert: every result the silo sent was found and decoded (so a leak would show)...
    assert stats.trained == 1
    assert len(headers) == stats.trained + stats.evaluated + stats.declined
    train = [h for h in headers if h.kind == fleet_pb2.TASK_KIND_TRAIN]
    evaluate = [h for h in headers if h.kind == fleet_pb2.TASK_KIND_EVALUATE]
    assert len(train) == 1 and len(evaluate) == 1
    # ...the training result carries the accounting values and nothing else...
    assert set(train[0].metrics) <= ACCOUNTING and "epsilon" in train[0].metrics
    assert train[0].num_examples != TRAIN_SIZE
    # ...the evaluation on the silo's own data sent no metric and no count...
    assert not evaluate[0].metrics and evaluate[0].num_examples in (0, 1)
    assert evaluate[0].num_examples != VAL_SIZE
    # ...and no metric name appears anywhere in the bytes, headers included.
    for name in (b"train_loss", b"accuracy", b"loss"):
        assert not any(name in connection for connection in raw), name


def test_opted_in_metric_is_sent_with_a_privacy_warning(tmp_path, caplog):
    from fedpriv.client import ReleasePolicy
    from fedpriv.errors import PrivacyWarning

    # Arrange
    torch.set_num_threads(1)
    policy = ReleasePolicy(
        share_metrics=("train_loss",), public_evaluation=True, public_num_examples=500
    )
    # Act
    with (
        caplog.at_level(logging.WARNING, logger="fedpriv.client"),
        pytest.warns(PrivacyWarning, match=r"train_loss.*un-noised"),
    ):
        raw, stats = recorded_federation(tmp_path, private_torch_client(), release=policy)
    headers = result_headers(raw)
    # Assert: the opted-in metric and the declared count travel; evaluation, declared
    # public, is sent as computed; the warning was logged as well as raised.
    train = [h for h in headers if h.kind == fleet_pb2.TASK_KIND_TRAIN]
    evaluate = [h for h in headers if h.kind == fleet_pb2.TASK_KIND_EVALUATE]
    assert stats.trained == 1 and stats.evaluated == 1
    assert set(train[0].metrics) == ACCOUNTING | {"train_loss"}
    assert train[0].num_examples == 500
    assert set(evaluate[0].metrics) == {"loss", "accuracy"}
    assert evaluate[0].num_examples == VAL_SIZE
    assert "not cover them" in caplog.text


def test_flower_silo_under_dp_is_filtered_the_same_way(tmp_path):
    from fedpriv.client.release import DP_NUM_EXAMPLES

    # Arrange
    client = PrivateFlowerAdapter(DPFlowerClient())
    # Act
    raw, stats = recorded_federation(tmp_path, client)
    headers = result_headers(raw)
    # Assert
    train = [h for h in headers if h.kind == fleet_pb2.TASK_KIND_TRAIN]
    evaluate = [h for h in headers if h.kind == fleet_pb2.TASK_KIND_EVALUATE]
    assert stats.trained == 1 and stats.declined == 1
    assert set(train[0].metrics) == ACCOUNTING
    assert train[0].num_examples == DP_NUM_EXAMPLES
    assert evaluate[0].declined_reason and not evaluate[0].metrics
    for name in (b"train_loss", b"worst_record_loss", b"accuracy"):
        assert not any(name in connection for connection in raw), name
