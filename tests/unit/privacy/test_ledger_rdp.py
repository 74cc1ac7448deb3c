"""The ledger reports the RDP bound of its history beside the tight epsilon it budgets."""

from __future__ import annotations

import pytest

from fedpriv.privacy.accounting import GaussianSteps, epsilon, epsilon_rdp
from fedpriv.privacy.ledger import PrivacyBudget, PrivacyLedger


def test_ledger_spends_the_tight_epsilon_and_reports_the_rdp_bound_beside_it(tmp_path):
    # Arrange: ten runs of 10-50 steps with different noise
    budget = PrivacyBudget(epsilon=50.0, delta=1e-5)
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", budget=budget)
    runs = [
        GaussianSteps(noise_multiplier=1.0 + i / 10, sample_rate=0.02, steps=10 + 4 * i)
        for i in range(10)
    ]
    # Act
    for number, run in enumerate(runs, start=1):
        ledger.record(run, round=number, max_grad_norm=1.0)
    ledger.close()  # one process holds a ledger at a time
    reopened = PrivacyLedger.open(tmp_path / "ledger.json", budget=budget)
    # Assert
    assert reopened.spent_epsilon() == pytest.approx(epsilon(runs, delta=1e-5), rel=1e-12)
    assert reopened.spent_epsilon_rdp() == pytest.approx(epsilon_rdp(runs, delta=1e-5))
    assert reopened.spent_epsilon() < reopened.spent_epsilon_rdp()


def test_empty_ledger_spends_nothing_under_either_accountant(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", budget=PrivacyBudget(epsilon=1.0))
    assert ledger.spent_epsilon() == ledger.spent_epsilon_rdp() == 0.0
