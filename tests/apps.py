"""Small apps that test processes load with --app / model.factory (no torch, fast)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpriv.client import EvaluateResult, FitResult


def make_model() -> dict[str, np.ndarray]:
    return {"w": np.zeros((64, 32), np.float32), "b": np.zeros(32, np.float32)}


class DeltaClient:
    def __init__(self, delta: float, sleep_s: float) -> None:
        self.delta = delta
        self.sleep_s = sleep_s

    def fit(self, parameters: Mapping[str, Any], *, config: Mapping[str, Any]) -> FitResult:
        time.sleep(self.sleep_s)
        return FitResult(
            parameters={k: v + np.float32(self.delta) for k, v in parameters.items()},
            num_examples=10,
            metrics={"train_loss": self.delta},
        )

    def evaluate(
        self, parameters: Mapping[str, Any], *, config: Mapping[str, Any]
    ) -> EvaluateResult:
        return EvaluateResult(num_examples=10, metrics={"loss": float(parameters["b"].mean())})


def make_client(config: Mapping[str, Any]) -> DeltaClient:
    return DeltaClient(float(config.get("delta", 1.0)), float(config.get("sleep_s", 0.0)))
