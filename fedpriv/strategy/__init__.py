"""Aggregation strategies: what a round's sum (or its updates) becomes."""

from __future__ import annotations

from fedpriv.strategy.base import Aggregator
from fedpriv.strategy.fedavg import FedAvg
from fedpriv.strategy.protocol import SpooledUpdate, Strategy, UpdateSum, WholeUpdateStrategy

__all__ = [
    "Aggregator",
    "FedAvg",
    "SpooledUpdate",
    "Strategy",
    "UpdateSum",
    "WholeUpdateStrategy",
]
