"""An example silo app written by ``fedpriv init``: replace the data with yours.

Each silo draws its own synthetic classification data from its ``silo_index``
(the ``[app]`` table of its TOML file), so nothing is downloaded and no two
silos hold the same records. ``make_model`` is what the coordinator starts
from; ``make_client`` is what each silo runs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpriv.client.torch import TorchClient

FEATURES = 20
CLASSES = 4


def make_model() -> nn.Module:
    """The shared network: FEATURES -> 64 -> CLASSES."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, CLASSES))


def _silo_data(index: int, examples: int) -> TensorDataset:
    # Every silo shares the task (the class centres) but draws its own records.
    centres = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(10_000 + index)
    labels = torch.randint(0, CLASSES, (examples,), generator=generator)
    inputs = centres[labels] + 1.5 * torch.randn(examples, FEATURES, generator=generator)
    return TensorDataset(inputs, labels)


def make_client(config: Mapping[str, object]) -> TorchClient:
    """Silo `config['silo_index']`: 800 training and 200 validation records of its own."""
    index = int(str(config.get("silo_index", 0)))
    data = _silo_data(index, 1000)
    train, val = torch.utils.data.random_split(
        data, [800, 200], generator=torch.Generator().manual_seed(index)
    )
    lr = float(str(config.get("lr", 0.01)))
    return TorchClient(
        make_model(),
        train_loader=DataLoader(train, batch_size=32, shuffle=True),
        val_loader=DataLoader(val, batch_size=200),
        loss_fn=nn.functional.cross_entropy,
        optimizer_factory=lambda params: torch.optim.Adam(params, lr=lr),
        epochs=int(str(config.get("epochs", 1))),
    )
