"""The folding interface between an upload and a round's running sum.

An :class:`Aggregator` receives the chunks of each complete, validated update
(from several threads at once). The streaming sum (``FedAvgAggregator``) and
the secure-aggregation ring sum (``RingSum``) implement it; what a round does
with the sum afterwards is the strategy's (``fedpriv.strategy.protocol``).
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Aggregator"]


class Aggregator(Protocol):
    """A running sum that chunks of updates are folded into."""

    def fold(self, offset: int, chunk: bytes | memoryview, *, weight: float) -> None:
        """Add ``weight * chunk`` to the aggregate.

        Chunks follow the global model's layout. The coordinator folds only
        complete, validated updates, each once, and never subtracts one again.
        Calls for different chunks may run concurrently.
        """
        ...
