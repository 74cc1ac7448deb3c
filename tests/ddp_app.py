"""A silo app that torchrun starts on two processes (tests/integration/test_torchrun.py)."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedpriv import LocalDP, TorchClient

RECORDS, FEATURES, CLASSES, BATCH = 96, 8, 3, 16


class Logged(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Synthetic records (the same on every rank); notes which ones this rank reads."""

    def __init__(self, out: pathlib.Path | None) -> None:
        generator = torch.Generator().manual_seed(3)
        self.x = torch.randn(RECORDS, FEATURES, generator=generator)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long()
        self.out = out
        self.read: set[int] = set()

    def __len__(self) -> int:
        return RECORDS

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.read.add(int(index))
        if self.out is not None:
            rank = os.environ.get("RANK", "0")
            (self.out / f"rank-{rank}.json").write_text(json.dumps(sorted(self.read)))
        return self.x[index], self.y[index]


class FailsOnRankZero(TorchClient):
    """Training raises on rank 0 in round `fail_round` (its user code fails there)."""

    fail_round = 0

    def fit(self, parameters, *, config):  # type: ignore[no-untyped-def]
        if os.environ.get("RANK") == "0" and config.get("round") == self.fail_round:
            raise RuntimeError("the silo's data loader broke")
        return super().fit(parameters, config=config)


def make_client(config: Mapping[str, Any]) -> TorchClient:
    out = pathlib.Path(str(config["out"])) if "out" in config else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = nn.Linear(FEATURES, CLASSES)
    privacy = LocalDP(noise_multiplier=1.0, max_grad_norm=1.0) if config.get("dp") else None
    data = Logged(out)
    data.read.clear()
    kind = FailsOnRankZero if config.get("fail_round") else TorchClient
    client = kind(
        model,
        train_loader=DataLoader(data, batch_size=BATCH),
        loss_fn=nn.functional.cross_entropy,
        optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1),
        epochs=1,
        device="cpu",
        privacy=privacy,
    )
    if isinstance(client, FailsOnRankZero):
        client.fail_round = int(config["fail_round"])
    return client
