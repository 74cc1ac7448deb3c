"""Differential privacy: accounting (pure), the silo's ledger and budget, Opacus training."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedpriv._lazy import lazy_exports
from fedpriv.privacy.accounting import (
    DEFAULT_ORDERS,
    Accountant,
    GaussianSteps,
    PrivacySpent,
    account,
    epsilon,
    epsilon_rdp,
    noise_multiplier_for,
)
from fedpriv.privacy.central import CentralDP
from fedpriv.privacy.ledger import PrivacyBudget, PrivacyLedger

if TYPE_CHECKING:
    from fedpriv.privacy.local import GradSampleMode, LocalDP

# Opacus and torch load when LocalDP or GradSampleMode is first used, not on import.
__getattr__, __dir__ = lazy_exports(
    globals(), {"GradSampleMode": "fedpriv.privacy.local", "LocalDP": "fedpriv.privacy.local"}
)

__all__ = [
    "DEFAULT_ORDERS",
    "Accountant",
    "CentralDP",
    "GaussianSteps",
    "GradSampleMode",
    "LocalDP",
    "PrivacyBudget",
    "PrivacyLedger",
    "PrivacySpent",
    "account",
    "epsilon",
    "epsilon_rdp",
    "noise_multiplier_for",
]
