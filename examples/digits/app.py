"""Digits quickstart: an MLP on scikit-learn's bundled 8x8 digits, split non-IID across silos.

Each silo draws 70% of its training examples from its own group of labels and
30% from the rest, so no silo sees a balanced picture. A stratified 20% of the
data is held out as the test set and shared out evenly for federated evaluation.
The split is deterministic (seeded), so each silo process computes its own part
without any data crossing the network.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpriv._types import Scalar
from fedpriv.client.torch import TorchClient

NUM_CLASSES = 10
SEED = 2026


def make_model() -> nn.Module:
    """input -> 512 -> 256 -> 128 -> classes, ReLU."""
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Linear(64, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, NUM_CLASSES),
    )


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Features scaled to [0, 1] and integer labels (bundled with scikit-learn, no download)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


def split_non_iid(
    labels: np.ndarray,
    *,
    num_silos: int,
    skew: float = 0.7,
    test_fraction: float = 0.2,
    seed: int = SEED,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Return (train indices, test indices) for each silo.

    Silo k prefers the labels ``{l : l % num_silos == k}``: a fraction `skew` of
    its training examples comes from them.
    """
    rng = np.random.default_rng(seed)
    test: list[int] = []
    train_pool: list[int] = []
    for label in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = int(round(len(members) * test_fraction))
        test.extend(members[:cut])
        train_pool.extend(members[cut:])
    pool = rng.permutation(np.array(train_pool))
    per_silo = len(pool) // num_silos
    preferred = [list(pool[labels[pool] % num_silos == k]) for k in range(num_silos)]
    others = list(pool)
    taken: set[int] = set()
    trains = []
    for k in range(num_silos):
        want_own = int(per_silo * skew)
        own = [i for i in preferred[k] if i not in taken][:want_own]
        taken.update(own)
        rest = [i for i in others if i not in taken and labels[i] % num_silos != k]
        rest = rest[: per_silo - len(own)]
        taken.update(rest)
        trains.append(np.array(own + rest))
    tests = np.array_split(rng.permutation(np.array(test)), num_silos)
    return trains, list(tests)


def make_client(config: Mapping[str, Scalar]) -> TorchClient:
    """Build silo `config['silo_index']` of `config['num_silos']`."""
    index = int(config.get("silo_index", 0))
    num_silos = int(config.get("num_silos", 3))
    lr = float(config.get("lr", 1e-3))
    features, labels = load_digits_arrays()
    trains, tests = split_non_iid(labels, num_silos=num_silos)
    train = TensorDataset(
        torch.from_numpy(features[trains[index]]), torch.from_numpy(labels[trains[index]])
    )
    test = TensorDataset(
        torch.from_numpy(features[tests[index]]), torch.from_numpy(labels[tests[index]])
    )
    generator = torch.Generator().manual_seed(SEED + index)
    return TorchClient(
        make_model(),
        train_loader=DataLoader(train, batch_size=32, shuffle=True, generator=generator),
        val_loader=DataLoader(test, batch_size=256),
        loss_fn=nn.functional.cross_entropy,
        optimizer_factory=lambda params: torch.optim.Adam(params, lr=lr),
        epochs=int(config.get("epochs", 1)),
        # [app] precision = "bf16" | "fp32"; "auto": bfloat16 on a GPU that has it
        precision=str(config.get("precision", "auto")),
    )


def make_private_model() -> nn.Module:
    """A smaller network for DP-SGD: input -> 64 -> classes, tanh.

    With a fixed privacy budget, fewer parameters mean less noise per useful
    signal, and bounded activations (tanh) keep per-sample gradients small, so
    less is lost to clipping (Papernot et al., "Tempered sigmoid activations").
    """
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, NUM_CLASSES))


def make_private_client(config: Mapping[str, Scalar]) -> TorchClient:
    """Silo `config['silo_index']` training with DP-SGD (Opacus) to a target epsilon."""
    from fedpriv.privacy.local import GradSampleMode, LocalDP

    index = int(config.get("silo_index", 0))
    num_silos = int(config.get("num_silos", 3))
    features, labels = load_digits_arrays()
    trains, tests = split_non_iid(labels, num_silos=num_silos)
    train = TensorDataset(
        torch.from_numpy(features[trains[index]]), torch.from_numpy(labels[trains[index]])
    )
    test = TensorDataset(
        torch.from_numpy(features[tests[index]]), torch.from_numpy(labels[tests[index]])
    )
    privacy = LocalDP(
        max_grad_norm=float(config.get("max_grad_norm", 1.0)),
        target_epsilon=float(config.get("target_epsilon", 8.0)),
        planned_rounds=int(config.get("planned_rounds", 5)),
        delta=float(config.get("delta", 1e-5)),
        grad_sample_mode=GradSampleMode(str(config.get("grad_sample_mode", "ghost"))),
    )
    lr = float(config.get("lr", 0.02))
    return TorchClient(
        make_private_model(),
        # Opacus replaces this loader by a Poisson sampler with the same expected batch size.
        train_loader=DataLoader(train, batch_size=int(config.get("batch_size", 160))),
        val_loader=DataLoader(test, batch_size=256),
        loss_fn=nn.functional.cross_entropy,
        optimizer_factory=lambda params: torch.optim.Adam(params, lr=lr),
        epochs=int(config.get("epochs", 8)),
        privacy=privacy,
    )
