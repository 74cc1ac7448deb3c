"""What a silo implements: ``fit`` and ``evaluate`` on named numpy arrays."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy.typing as npt

from fedpriv._types import Scalar

__all__ = ["Client", "EvaluateResult", "FitResult"]


@dataclass(frozen=True, slots=True, kw_only=True)
class FitResult:
    """Result of local training.

    Args:
        parameters: Updated tensors, same names and shapes as received.
        num_examples: Training examples used; the update's weight in FedAvg.
        metrics: Scalars to report (e.g. ``loss``); never raw data.
    """

    parameters: Mapping[str, npt.NDArray[Any]]
    num_examples: int
    metrics: Mapping[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluateResult:
    """Result of local evaluation.

    Args:
        num_examples: Examples evaluated; the weight of these metrics.
        metrics: Scalars such as ``loss`` and ``accuracy``.
    """

    num_examples: int
    metrics: Mapping[str, Scalar] = field(default_factory=dict)


class Client(Protocol):
    """A silo's training code, called by the runtime for each task.

    The arrays passed in are read-only views of the received model; copy them
    into your model rather than modifying them.

    Example:
        >>> import numpy as np
        >>> class Mean:
        ...     def fit(self, parameters, *, config):
        ...         return FitResult(parameters={k: v + 1 for k, v in parameters.items()},
        ...                          num_examples=10)
        ...     def evaluate(self, parameters, *, config):
        ...         return EvaluateResult(num_examples=10, metrics={"loss": 0.0})
        >>> Mean().fit({"w": np.zeros(2)}, config={}).parameters["w"].tolist()
        [1.0, 1.0]
    """

    def fit(
        self, parameters: Mapping[str, npt.NDArray[Any]], *, config: Mapping[str, Scalar]
    ) -> FitResult:
        """Train from `parameters` on local data and return the updated parameters."""
        ...

    def evaluate(
        self, parameters: Mapping[str, npt.NDArray[Any]], *, config: Mapping[str, Scalar]
    ) -> EvaluateResult:
        """Evaluate `parameters` on local validation data."""
        ...
