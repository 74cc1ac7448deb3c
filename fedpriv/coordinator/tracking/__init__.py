"""Experiment tracking: the federation as an MLflow run and TensorBoard scalars (optional).

Configured in the coordinator's ``[tracking]`` table (docs/tracking.md); the
packages come with ``pip install 'fedpriv[tracking]'`` and are imported only when
a sink is configured.
"""

from __future__ import annotations

from fedpriv.coordinator.tracking.records import (
    RunStatus,
    TrackingSink,
    config_params,
    final_metrics,
    round_metrics,
)
from fedpriv.coordinator.tracking.reporter import Tracking
from fedpriv.coordinator.tracking.settings import (
    MlflowSettings,
    TensorBoardSettings,
    TrackingConfig,
)

__all__ = [
    "MlflowSettings",
    "RunStatus",
    "TensorBoardSettings",
    "Tracking",
    "TrackingConfig",
    "TrackingSink",
    "config_params",
    "final_metrics",
    "round_metrics",
]
