"""Only what trains travels: a frozen base model never crosses the wire (mTLS, real SQLite)."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpriv import TorchClient
from fedpriv.coordinator import Coordinator, ModelSource, Store, read_checkpoint
from tests.helpers import make_config, silo_thread, wait_silos

BASE_IN, BASE_OUT, CLASSES = 64, 256, 3
FACTORY = "tests.integration.test_frozen_base:make_model"


def make_model() -> nn.Module:
    """A 'pretrained' base (the same weights in every silo, frozen) and a trainable head."""
    generator = torch.Generator().manual_seed(1234)
    base = nn.Linear(BASE_IN, BASE_OUT)
    with torch.no_grad():
        base.weight.copy_(torch.randn(BASE_OUT, BASE_IN, generator=generator) / 8)
        base.bias.zero_()
    base.requires_grad_(False)
    return nn.Sequential(base, nn.Tanh(), nn.Linear(BASE_OUT, CLASSES))


def silo(seed: int) -> TorchClient:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(120, BASE_IN, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return TorchClient(
        make_model(),
        train_loader=DataLoader(TensorDataset(x, y), batch_size=30),
        val_loader=DataLoader(TensorDataset(x, y), batch_size=60),
        loss_fn=nn.functional.cross_entropy,
        optimizer_factory=lambda p: torch.optim.Adam(p, lr=0.01),
        epochs=2,
        device="cpu",
    )


def test_a_frozen_base_stays_on_the_silos_and_only_the_head_is_federated(tmp_path, pki):
    # Arrange
    config = make_config(tmp_path, pki.root, {"unused": np.zeros(1, np.float32)}, num_rounds=2)
    config = dataclasses.replace(config, model=ModelSource(factory=FACTORY))
    a, b = silo(1), silo(2)
    base = make_model()[0].weight.detach().clone()
    head_bytes = 4 * (BASE_OUT * CLASSES + CLASSES)
    # Act
    with Coordinator(config) as coordinator:
        with (
            silo_thread(a, port=coordinator.port, tls=pki.tls("silo-a")) as ta,
            silo_thread(b, port=coordinator.port, tls=pki.tls("silo-b")) as tb,
        ):
            assert coordinator.wait(timeout_s=120)
            wait_silos([ta, tb])
    # Assert: the global model is the head alone, and it is what the silos hold
    store = Store(config.state_dir)
    committed = store.last_committed()
    assert committed is not None and committed.round == 2
    final = read_checkpoint(committed.checkpoint, sha256=committed.sha256).arrays()
    participants = [p for r in (1, 2) for p in store.participants(r)]
    store.close()
    assert sorted(final) == ["2.bias", "2.weight"]
    for client in (a, b):
        np.testing.assert_array_equal(final["2.weight"], client.model[2].weight.detach().numpy())
        # the base never changed, and never travelled
        assert torch.equal(client.model[0].weight, base)
    # every train result was accepted, and each was one head: far below the base's 65 kB
    train = [(outcome, detail) for task, _, outcome, detail in participants if task == "train"]
    assert len(train) == 4 and all(outcome == "accepted" for outcome, _ in train), train
    with contextlib.closing(sqlite3.connect(config.state_dir / "state.sqlite3")) as db:
        sent = [
            n for (n,) in db.execute("SELECT bytes_received FROM participants WHERE task = 'train'")
        ]
    assert all(head_bytes <= n < 2 * head_bytes for n in sent), (sent, head_bytes)
