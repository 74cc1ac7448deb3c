"""Client and model used by the benchmarks: 'training' adds a small perturbation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpriv.client import EvaluateResult, FitResult


def perturb(parameters: Mapping[str, Any], step: np.float32) -> dict[str, Any]:
    """The received arrays plus `step`, in place where they are writable.

    Both systems' benchmark clients do this, so that neither pays for allocating
    (and having the kernel zero) a fresh model every round: the benchmark
    measures transport, serialisation and aggregation.
    """
    out = {}
    for name, array in parameters.items():
        if array.flags.writeable:
            np.add(array, step, out=array)
            out[name] = array
        else:
            out[name] = array + step
    return out


class PerturbClient:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def fit(self, parameters: Mapping[str, Any], *, config: Mapping[str, Any]) -> FitResult:
        step = np.float32(self.rng.uniform(-1e-3, 1e-3))
        return FitResult(parameters=perturb(parameters, step), num_examples=100)

    def evaluate(
        self, parameters: Mapping[str, Any], *, config: Mapping[str, Any]
    ) -> EvaluateResult:
        return EvaluateResult(num_examples=100)


def make_client(config: Mapping[str, Any]) -> PerturbClient:
    return PerturbClient(int(config.get("seed", 0)))


def model_arrays(params: int, *, pieces: int = 4) -> dict[str, np.ndarray]:
    """`params` float32 parameters split over `pieces` arrays (plus a remainder)."""
    size = params // pieces
    arrays = {f"layer{i}.weight": np.zeros(size, np.float32) for i in range(pieces)}
    if params - size * pieces:
        arrays["tail"] = np.zeros(params - size * pieces, np.float32)
    return arrays


def make_torch_client(config: Mapping[str, Any]) -> Any:
    """A TorchClient over the benchmark's model (`model_arrays`): one SGD step per round.

    Its loss touches every weight, so each round allocates a full gradient, as
    training does. ``copy_in = true`` turns off receiving into its parameters (the
    runtime then copies each model in), for a before/after comparison.
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from fedpriv import TorchClient

    shapes = {n: a.shape for n, a in model_arrays(int(config["params"])).items()}

    class Holder(nn.Module):
        def __init__(self, size: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(size))

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, shape in shapes.items():
                self.add_module(name.split(".")[0], Holder(shape[0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return sum(p.sum() for p in self.parameters()) * x.mean(dim=1)

    client = TorchClient(
        Flat(),
        train_loader=DataLoader(TensorDataset(torch.ones(2, 4), torch.zeros(2)), batch_size=2),
        loss_fn=lambda out, target: ((out - target) ** 2).mean(),
        optimizer_factory=lambda p: torch.optim.SGD(p, lr=1e-9),
        device="cpu",
    )
    if config.get("copy_in"):
        client.receive_buffer = lambda layout: None  # type: ignore[method-assign]
    return client
