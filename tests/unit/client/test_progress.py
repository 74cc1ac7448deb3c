"""Silo training progress: log lines per epoch, bars on a terminal, nothing when quiet."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpriv.client import progress
from fedpriv.client.progress import ProgressMode, set_mode
from fedpriv.client.torch import TorchClient
from fedpriv.privacy.local import LocalDP
from fedpriv.wire.torch_interop import arrays_from_state_dict


@pytest.fixture(autouse=True)
def restore_mode():
    yield
    set_mode(ProgressMode.AUTO)


def make_client(privacy: LocalDP | None = None) -> TorchClient:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 4, generator=generator)
    labels = torch.randint(0, 2, (64,), generator=generator)
    return TorchClient(
        nn.Linear(4, 2),
        train_loader=DataLoader(TensorDataset(inputs, labels), batch_size=16),
        loss_fn=nn.functional.cross_entropy,
        optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1),
        epochs=3,
        device="cpu",
        privacy=privacy,
    )


def fit(client: TorchClient) -> None:
    client.fit(arrays_from_state_dict(client.model.state_dict()), config={"round": 7})


@pytest.mark.parametrize("private", [False, True])
def test_lines_mode_logs_one_line_per_epoch(caplog, private):
    set_mode(ProgressMode.LINES)
    privacy = LocalDP(noise_multiplier=1.0, max_grad_norm=1.0) if private else None
    with caplog.at_level(logging.INFO, logger="fedpriv.client.training"):
        fit(make_client(privacy))
    lines = [r.getMessage() for r in caplog.records if r.name == "fedpriv.client.training"]
    assert [line.split(" loss ")[0] for line in lines] == [
        "round 7 epoch 1/3",
        "round 7 epoch 2/3",
        "round 7 epoch 3/3",
    ]
    assert all(float(line.split(" loss ")[1].split()[0]) > 0 for line in lines)


def test_off_mode_is_silent(caplog, capsys):
    set_mode(ProgressMode.OFF)
    with caplog.at_level(logging.INFO, logger="fedpriv.client.training"):
        fit(make_client())
    assert not [r for r in caplog.records if r.name == "fedpriv.client.training"]
    assert capsys.readouterr().err == ""


def test_bars_advance_per_batch_and_epoch(monkeypatch):
    buffer = io.StringIO()
    bars = progress.EpochProgress(epochs=2, batches=4, label="round 1", bars=True)
    bars._progress.console.file = buffer
    for _ in range(2):
        for _ in range(4):
            bars.batch()
        bars.epoch_done(0.5)
    tasks = list(bars._progress.tasks)
    bars.close()
    assert [(t.completed, t.total) for t in tasks] == [(4, 4), (4, 4)]
    assert [t.description for t in tasks] == [
        "round 1 epoch 1/2 loss 0.5000",
        "round 1 epoch 2/2 loss 0.5000",
    ]
