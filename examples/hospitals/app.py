"""Three hospitals, one tumour classifier: scikit-learn's bundled breast-cancer data.

The 569 cases are split once, with a fixed seed, into a stratified 20% test set
(shared out for federated evaluation) and three hospitals of different sizes
(50%, 30% and 20% of the rest). Every hospital scales its features with the
same public constants (:data:`FEATURE_RANGES`), never with statistics of its own
records: the released model depends on the scaling, and DP-SGD's guarantee
covers only what the noised gradients reveal. Each hospital trains a logistic
regression with DP-SGD (Opacus) to a target epsilon.
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

# Public (min, max) of each feature, in the dataset's order, as published in the
# dataset's documentation (UCI "Breast Cancer Wisconsin (Diagnostic)", the
# "Summary Statistics" table of scikit-learn's load_breast_cancer().DESCR). Every
# party can read them before the federation starts and no hospital computes
# anything from its own records to scale its features, so the scaling adds no
# privacy cost. They stand for the reference ranges a clinical team fixes from
# the literature; a value outside its range is clipped to it.
FEATURE_RANGES: tuple[tuple[float, float], ...] = (
    (6.981, 28.11), (9.71, 39.28), (43.79, 188.5), (143.5, 2501.0), (0.053, 0.163),
    (0.019, 0.345), (0.0, 0.427), (0.0, 0.201), (0.106, 0.304), (0.05, 0.097),
    (0.112, 2.873), (0.36, 4.885), (0.757, 21.98), (6.802, 542.2), (0.002, 0.031),
    (0.002, 0.135), (0.0, 0.396), (0.0, 0.053), (0.008, 0.079), (0.001, 0.03),
    (7.93, 36.04), (12.02, 49.54), (50.41, 251.2), (185.2, 4254.0), (0.071, 0.223),
    (0.027, 1.058), (0.0, 1.252), (0.0, 0.291), (0.156, 0.664), (0.055, 0.208),
)  # fmt: skip


def scale_features(inputs: np.ndarray) -> np.ndarray:
    """Map each feature's public range onto [-2, 2] on a log scale; no data statistics.

    Most features are right-skewed (areas, standard errors), so the range is
    taken on ``log(x + range/100)``; values outside the range are clipped to it.
    """
    low, high = np.array(FEATURE_RANGES, dtype=np.float64).T
    offset = (high - low) / 100.0  # keeps the log finite where the range starts at 0

    def log(x: np.ndarray) -> np.ndarray:
        return np.log(x + offset)

    clipped = np.clip(inputs.astype(np.float64), low, high)
    unit = (log(clipped) - log(low)) / (log(high) - log(low))
    return (4.0 * unit - 2.0).astype(np.float32)


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
    return (
        scale_features(inputs[train]),
        labels[train],
        scale_features(inputs[tests]),
        labels[tests],
    )


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
