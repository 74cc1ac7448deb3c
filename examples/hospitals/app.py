"""Three hospitals, one tumour classifier: scikit-learn's bundled breast-cancer data.

The 569 cases are split once, with a fixed seed, into a stratified 20% test set
(shared out for federated evaluation) and three hospitals of different sizes
(50%, 30% and 20% of the rest). Each hospital standardises its features with
its own means and deviations, so not even summary statistics leave it. Each
trains a logistic regression with DP-SGD (Opacus) to a target epsilon.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpriv._types import Scalar
from fedpriv.client.torch import TorchClient
from fedpriv.privacy.local import LocalDP

SEED = 7
SHARES = (0.5, 0.3, 0.2)
FEATURES = 30


def make_model() -> nn.Module:
    """Logistic regression over the 30 features (two logits)."""
    torch.manual_seed(SEED)
    model = nn.Linear(FEATURES, 2)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    return model


def hospital_split(index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hospital `index`'s (train inputs, train labels, test inputs, test labels)."""
    from sklearn.datasets import load_breast_cancer  # bundled: no download

    data = load_breast_cancer()
    inputs, labels = data.data.astype(np.float32), data.target.astype(np.int64)
    rng = np.random.default_rng(SEED)
    test: list[int] = []
    pool: list[int] = []
    for label in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = round(0.2 * len(members))
        test += list(members[:cut])
        pool += list(members[cut:])
    pool_array = rng.permutation(np.array(pool))
    bounds = np.cumsum([0, *(round(s * len(pool_array)) for s in SHARES)])
    bounds[-1] = len(pool_array)
    train = pool_array[bounds[index] : bounds[index + 1]]
    tests = np.array_split(rng.permutation(np.array(test)), len(SHARES))[index]
    # Standardised with this hospital's own statistics only.
    mean = inputs[train].mean(axis=0)
    std = inputs[train].std(axis=0) + 1e-6
    scale = lambda x: ((x - mean) / std).astype(np.float32)  # noqa: E731
    return scale(inputs[train]), labels[train], scale(inputs[tests]), labels[tests]


def make_client(config: Mapping[str, Scalar]) -> TorchClient:
    """Hospital `config['hospital_index']` training with DP-SGD to `config['target_epsilon']`."""
    index = int(config.get("hospital_index", 0))
    train_x, train_y, test_x, test_y = hospital_split(index)
    privacy = LocalDP(
        max_grad_norm=float(config.get("max_grad_norm", 1.0)),
        target_epsilon=float(config.get("target_epsilon", 4.0)),
        planned_rounds=int(config.get("planned_rounds", 6)),
        delta=float(config.get("delta", 1e-5)),
    )
    lr = float(config.get("lr", 0.1))
    return TorchClient(
        make_model(),
        # Opacus turns this into Poisson sampling with the same expected batch size.
        train_loader=DataLoader(
            TensorDataset(torch.from_numpy(train_x), torch.from_numpy(train_y)),
            batch_size=int(config.get("batch_size", 32)),
        ),
        val_loader=DataLoader(
            TensorDataset(torch.from_numpy(test_x), torch.from_numpy(test_y)), batch_size=256
        ),
        loss_fn=nn.functional.cross_entropy,
        optimizer_factory=lambda params: torch.optim.SGD(params, lr=lr),
        epochs=int(config.get("epochs", 2)),
        privacy=privacy,
    )
