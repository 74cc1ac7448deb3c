"""Differential privacy: accounting (pure), the silo's ledger and budget, Opacus training."""

from __future__ import annotations

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

__all__ = [
    "DEFAULT_ORDERS",
    "Accountant",
    "GaussianSteps",
    "PrivacySpent",
    "account",
    "epsilon",
    "epsilon_rdp",
    "noise_multiplier_for",
]
