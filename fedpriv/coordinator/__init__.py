"""The coordinator: configuration, rounds state machine, durable store and daemon."""

from __future__ import annotations

from fedpriv.coordinator.checkpoint import map_checkpoint, read_checkpoint, write_checkpoint
from fedpriv.coordinator.config import (
    CoordinatorConfig,
    ModelSource,
    RoundConfig,
    SecAggConfig,
    TLSFiles,
)
from fedpriv.coordinator.daemon import Coordinator, load_initial_model
from fedpriv.coordinator.federation import Federation, RoundReporter, RoundSummary
from fedpriv.coordinator.store import Store

__all__ = [
    "Coordinator",
    "CoordinatorConfig",
    "Federation",
    "ModelSource",
    "RoundConfig",
    "RoundReporter",
    "RoundSummary",
    "SecAggConfig",
    "Store",
    "TLSFiles",
    "load_initial_model",
    "map_checkpoint",
    "read_checkpoint",
    "write_checkpoint",
]
