"""The model (a linear regression), its data (generated per partition) and training."""

from __future__ import annotations

import numpy as np

FEATURES = 6


def load_data(partition_id: int, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """Partition `partition_id` of a generated regression set; partitions differ in size."""
    rng = np.random.default_rng(100 + partition_id + 7 * num_partitions)
    x = rng.normal(size=(40 + 10 * partition_id, FEATURES)).astype(np.float32)
    true_w = np.linspace(-1.0, 1.0, FEATURES, dtype=np.float32)
    noise = rng.normal(scale=0.1, size=len(x)).astype(np.float32)
    return x, (x @ true_w + np.float32(0.5) + noise).astype(np.float32)


def initial_weights() -> list[np.ndarray]:
    return [np.zeros(FEATURES, np.float32), np.zeros(1, np.float32)]


def train(
    weights: list[np.ndarray], x: np.ndarray, y: np.ndarray, lr: float, epochs: int
) -> tuple[list[np.ndarray], float]:
    """Full-batch gradient descent on the mean squared error; the new weights and the loss."""
    w, b = (np.array(a, dtype=np.float32) for a in weights)
    for _ in range(epochs):
        err = x @ w + b - y
        w = w - np.float32(lr) * (x.T @ err) / np.float32(len(x))
        b = b - np.float32(lr) * np.mean(err, keepdims=True)
    return [w.astype(np.float32), b.astype(np.float32)], float(np.mean((x @ w + b - y) ** 2))


def evaluate(weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    w, b = weights
    return float(np.mean((x @ w + b - y) ** 2))
