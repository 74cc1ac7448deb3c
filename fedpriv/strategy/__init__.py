"""Aggregation strategies: the Strategy protocol and streaming FedAvg."""

from __future__ import annotations

from fedpriv.strategy.base import Aggregator, NoisyAggregator, Strategy
from fedpriv.strategy.fedavg import FedAvg

__all__ = ["Aggregator", "FedAvg", "NoisyAggregator", "Strategy"]
