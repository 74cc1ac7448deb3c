from __future__ import annotations

import json

import pytest

from fedpriv.errors import ConfigError, PrivacyBudgetExceeded, StoreError
from fedpriv.privacy import GaussianSteps, epsilon
from fedpriv.privacy.ledger import PrivacyBudget, PrivacyLedger

RUN = GaussianSteps(noise_multiplier=1.0, sample_rate=0.1, steps=50)


def test_spend_is_on_disk_before_record_returns_and_survives_reopening(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path, budget=PrivacyBudget(epsilon=100.0))
    spent = ledger.record(RUN, round=3, max_grad_norm=1.0)
    on_disk = json.loads(path.read_text())
    assert on_disk["entries"][0]["round"] == 3 and on_disk["entries"][0]["steps"] == 50
    assert PrivacyLedger.open(path, budget=PrivacyBudget(epsilon=100.0)).spent_epsilon() == spent
    assert spent == pytest.approx(epsilon([RUN], delta=1e-5))
    assert path.stat().st_mode & 0o777 == 0o600


def test_check_refuses_a_run_that_would_overspend_and_names_the_numbers(tmp_path):
    one = epsilon([RUN], delta=1e-5)
    ledger = PrivacyLedger.open(tmp_path / "l.json", budget=PrivacyBudget(epsilon=one * 1.2))
    assert ledger.check(RUN) == pytest.approx(one)
    ledger.record(RUN, round=1, max_grad_norm=1.0)
    with pytest.raises(PrivacyBudgetExceeded) as caught:
        ledger.check(RUN)
    assert caught.value.spent_epsilon == pytest.approx(one)
    assert caught.value.projected_epsilon > caught.value.budget_epsilon
    assert "refuses to train" in str(caught.value)


def test_unreadable_ledger_stops_the_silo(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    with pytest.raises(StoreError, match="refusing to train"):
        PrivacyLedger.open(path, budget=PrivacyBudget(epsilon=1.0))


@pytest.mark.parametrize(
    ("eps", "delta"), [(0.0, 1e-5), (float("inf"), 1e-5), (1.0, 0.0), (1.0, 1.0)]
)
def test_bad_budgets_are_refused(eps, delta):
    with pytest.raises(ConfigError):
        PrivacyBudget(epsilon=eps, delta=delta)
