"""Small apps that test processes load with --app / model.factory (no torch, fast)."""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpriv.client import EvaluateResult, FitResult


def make_model() -> dict[str, np.ndarray]:
    return {"w": np.zeros((64, 32), np.float32), "b": np.zeros(32, np.float32)}


class DeltaClient:
    def __init__(self, delta: float) -> None:
        self.delta = delta

    def fit(self, parameters: Mapping[str, Any], *, config: Mapping[str, Any]) -> FitResult:
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
    return DeltaClient(float(config.get("delta", 1.0)))


class AccountedClient(DeltaClient):
    """Adds a fixed delta and declares one fixed DP mechanism per run, for the ledger.

    The runtime checks and records the declared mechanism exactly as it does a
    TorchClient's, without torch's start-up cost (the crash tests run many processes).
    """

    def plan_privacy(self, config: Mapping[str, Any]) -> Any:
        from fedpriv.privacy import GaussianSteps

        return GaussianSteps(noise_multiplier=2.0, sample_rate=0.2, steps=5)


def make_accounted_client(config: Mapping[str, Any]) -> AccountedClient:
    return AccountedClient(float(config.get("delta", 1.0)))


def make_private_client(config: Mapping[str, Any]):
    """A tiny DP-SGD silo whose parameters match make_model (w, b); functorch per-sample grads."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from fedpriv.client.torch import TorchClient
    from fedpriv.privacy.local import GradSampleMode, LocalDP

    class Linear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(64, 32))
            self.b = nn.Parameter(torch.zeros(32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.w + self.b

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(100, 64, generator=generator), torch.randint(0, 32, (100,), generator=generator)
    )
    client = TorchClient(
        Linear(),
        train_loader=DataLoader(data, batch_size=20),
        loss_fn=nn.functional.cross_entropy,
        optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1),
        privacy=LocalDP(
            noise_multiplier=float(config.get("noise_multiplier", 2.0)),
            grad_sample_mode=GradSampleMode.FUNCTORCH,
        ),
        device="cpu",
    )
    if "hold_from_round" in config:
        # A fault-injection point: from this round on, the silo says so on stderr and
        # blocks before planning, on a FIFO nobody writes to, until the test kills it.
        hold_from, fifo = int(config["hold_from_round"]), pathlib.Path(str(config["hold_fifo"]))
        plan = client.plan_privacy

        def plan_privacy(task_config: Mapping[str, Any]) -> Any:
            if int(task_config.get("round", 0)) >= hold_from:
                print(f"holding round {task_config['round']}", file=sys.stderr, flush=True)
                fifo.open("rb").close()
            return plan(task_config)

        client.plan_privacy = plan_privacy  # type: ignore[method-assign]  # test seam
    return client


def random_update(index: int, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The update silo `index` sends (deterministic, so a test can recompute it)."""
    rng = np.random.default_rng(1000 + index)
    return {name: rng.normal(0.0, 0.05, shape).astype(np.float32) for name, shape in shapes.items()}


class RandomUpdateClient:
    """Adds a fixed random update (seeded by silo index) to the model it receives."""

    def __init__(self, index: int) -> None:
        self.index = index

    def fit(self, parameters: Mapping[str, Any], *, config: Mapping[str, Any]) -> FitResult:
        update = random_update(self.index, {k: v.shape for k, v in parameters.items()})
        return FitResult(
            parameters={k: v + update[k] for k, v in parameters.items()},
            num_examples=10,
            metrics={"train_loss": 0.0},
        )

    def evaluate(
        self, parameters: Mapping[str, Any], *, config: Mapping[str, Any]
    ) -> EvaluateResult:
        return EvaluateResult(num_examples=10, metrics={"loss": 0.0})


def make_random_client(config: Mapping[str, Any]) -> RandomUpdateClient:
    return RandomUpdateClient(int(config["index"]))


def flower_client_fn(context):
    """A Flower client_fn, as a Flower app defines it (used with --flower-app)."""
    from flwr.client import NumPyClient

    step = float(context.node_config.get("step", 1.0))

    class Quickstart(NumPyClient):
        def fit(self, parameters, config):
            return [p + np.float32(step) for p in parameters], 10, {}

        def evaluate(self, parameters, config):
            return 0.0, 10, {}

    return Quickstart().to_client()
