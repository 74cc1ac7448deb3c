"""The plug-in point for aggregation rules.

A strategy opens one :class:`Aggregator` per round. The coordinator feeds it
the chunks of each complete, validated update (from several threads at once)
and finally asks it for the next global model. Streaming strategies keep O(model) state;
rules that need every update at once (median, Krum) must spool to disk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from fedpriv.wire import Model

__all__ = ["Aggregator", "NoisyAggregator", "Strategy"]


class Aggregator(Protocol):
    """Running state of one round's aggregation."""

    def fold(self, offset: int, chunk: bytes | memoryview, *, weight: float) -> None:
        """Add ``weight * chunk`` to the aggregate.

        Chunks follow the global model's layout. The coordinator folds only
        complete, validated updates, each once, and never subtracts one again.
        Calls for different chunks may run concurrently.
        """
        ...

    def finalize(self, *, total_weight: float) -> Model:
        """Return the next global model from everything folded; call once."""
        ...


@runtime_checkable
class NoisyAggregator(Aggregator, Protocol):
    """An aggregator of sums that can be perturbed before finalizing (DP-FedAvg noise)."""

    def perturb_sums(self, perturb: Callable[[npt.NDArray[np.floating]], None]) -> None:
        """Apply `perturb` in place to each tensor's running (unnormalised) sum."""
        ...


class Strategy(Protocol):
    """An aggregation rule (FedAvg, FedAdam, robust rules, Flower adapters)."""

    @property
    def name(self) -> str:
        """Short name for logs and the store."""
        ...

    def begin_round(self, round: int, *, model: Model) -> Aggregator:
        """Open the aggregation of `round`, starting from the global `model`."""
        ...
