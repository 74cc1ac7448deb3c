"""Aggregation strategies: streaming FedAvg, server optimisers, robust rules, by name.

:mod:`fedpriv.strategy.protocol` holds the contract every aggregation mode ends
in: an :class:`UpdateSum` for a :class:`Strategy`, or the round's
:class:`SpooledUpdate` objects for a :class:`WholeUpdateStrategy`.
"""

from __future__ import annotations

from fedpriv.strategy.base import Aggregator
from fedpriv.strategy.fedavg import FedAvg
from fedpriv.strategy.fedopt import FedAdagrad, FedAdam, FedYogi
from fedpriv.strategy.fedprox import FedProx
from fedpriv.strategy.protocol import (
    SpooledUpdate,
    Strategy,
    UpdateSum,
    WholeUpdateStrategy,
    model_from_flat,
)
from fedpriv.strategy.registry import StrategyName, build_strategy
from fedpriv.strategy.robust import Krum, Median, TrimmedMean

__all__ = [
    "Aggregator",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "FedYogi",
    "Krum",
    "Median",
    "SpooledUpdate",
    "Strategy",
    "StrategyName",
    "TrimmedMean",
    "UpdateSum",
    "WholeUpdateStrategy",
    "build_strategy",
    "model_from_flat",
]
