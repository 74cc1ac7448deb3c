from __future__ import annotations

import json
import os

import pytest

from fedpriv.errors import ConfigError, PrivacyBudgetExceeded, StoreError
from fedpriv.privacy import GaussianSteps, epsilon
from fedpriv.privacy.ledger import PrivacyBudget, PrivacyLedger

RUN = GaussianSteps(noise_multiplier=1.0, sample_rate=0.1, steps=50)


def test_spend_is_on_disk_before_record_returns_and_survives_reopening(tmp_path):
    path = tmp_path / "ledger.json"
    with PrivacyLedger.open(path, budget=PrivacyBudget(epsilon=100.0)) as ledger:
        spent = ledger.record(RUN, round=3, max_grad_norm=1.0)
        on_disk = json.loads(path.read_text())
    assert on_disk["entries"][0]["round"] == 3 and on_disk["entries"][0]["steps"] == 50
    with PrivacyLedger.open(path, budget=PrivacyBudget(epsilon=100.0)) as again:
        assert again.spent_epsilon() == spent
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


def budget(delta: float = 1e-5) -> PrivacyBudget:
    return PrivacyBudget(epsilon=100.0, delta=delta)


def test_a_ledger_read_at_another_delta_is_refused_and_says_what_to_do(tmp_path):
    # Arrange: one run recorded at delta 1e-5
    path = tmp_path / "ledger.json"
    with PrivacyLedger.open(path, budget=budget(1e-5)) as ledger:
        ledger.record(RUN, round=1, max_grad_norm=1.0)
    # Act: the same history at a larger delta would read as a smaller epsilon
    assert epsilon([RUN], delta=1e-3) < epsilon([RUN], delta=1e-5)
    with pytest.raises(ConfigError) as caught:
        PrivacyLedger.open(path, budget=budget(1e-3))
    # Assert
    message = str(caught.value)
    assert "recorded at delta = 1e-05" in message and "[privacy] delta = 0.001" in message
    assert "Set [privacy] delta = 1e-05 again" in message and "--reset-ledger" in message
    with PrivacyLedger.open(path, budget=budget(1e-5)) as ledger:  # the refusal locked nothing
        assert len(ledger.entries) == 1


def test_delta_is_stored_in_the_ledger(tmp_path):
    path = tmp_path / "ledger.json"
    with PrivacyLedger.open(path, budget=budget(3e-6)):
        pass
    assert json.loads(path.read_text())["delta"] == 3e-6


def test_a_deleted_ledger_is_refused_and_reset_only_knowingly(tmp_path, caplog):
    # Arrange
    path = tmp_path / "ledger.json"
    with PrivacyLedger.open(path, budget=budget()) as ledger:
        ledger.record(RUN, round=1, max_grad_norm=1.0)
        ledger.record(RUN, round=2, max_grad_norm=1.0)
    path.unlink()
    # Act / Assert: refused, with what existed and what to do
    with pytest.raises(StoreError) as caught:
        PrivacyLedger.open(path, budget=budget())
    assert "is missing" in str(caught.value) and "2 runs recorded" in str(caught.value)
    assert "--reset-ledger" in str(caught.value)
    assert not path.exists()
    # Act / Assert: with reset, it starts over under a new id, loudly
    with PrivacyLedger.open(path, budget=budget(), reset=True) as ledger:
        assert ledger.entries == ()
    assert "--reset-ledger" in caplog.text and "no longer counted" in caplog.text
    with PrivacyLedger.open(path, budget=budget()) as ledger:  # and is a ledger like any other
        assert ledger.entries == ()


def test_a_restored_older_copy_or_another_ledger_is_refused(tmp_path):
    # Arrange: keep a copy after one run, then record a second
    path = tmp_path / "ledger.json"
    other = tmp_path / "other" / "ledger.json"
    with PrivacyLedger.open(path, budget=budget()) as ledger:
        ledger.record(RUN, round=1, max_grad_norm=1.0)
        old_copy = path.read_bytes()
        ledger.record(RUN, round=2, max_grad_norm=1.0)
    with PrivacyLedger.open(other, budget=budget()) as ledger:
        ledger.record(RUN, round=1, max_grad_norm=1.0)
        ledger.record(RUN, round=2, max_grad_norm=1.0)
    # Act / Assert: rolled back
    path.write_bytes(old_copy)
    with pytest.raises(StoreError, match="holds 1 runs, the marker recorded 2"):
        PrivacyLedger.open(path, budget=budget())
    # Act / Assert: swapped for another silo's ledger of the same length
    path.write_bytes(other.read_bytes())
    with pytest.raises(StoreError, match="it is another ledger"):
        PrivacyLedger.open(path, budget=budget())


def test_a_second_open_of_one_ledger_is_refused_until_the_first_closes(tmp_path):
    path = tmp_path / "ledger.json"
    first = PrivacyLedger.open(path, budget=budget())
    with pytest.raises(StoreError, match=f"in use by another process \\(pid {os.getpid()}"):
        PrivacyLedger.open(path, budget=budget())
    first.close()
    with pytest.raises(StoreError, match="closed"):
        first.record(RUN, round=1, max_grad_norm=1.0)
    with PrivacyLedger.open(path, budget=budget()) as second:
        assert second.entries == ()


def test_record_rechecks_the_budget_so_a_stale_check_cannot_overspend(tmp_path):
    one = epsilon([RUN], delta=1e-5)
    with PrivacyLedger.open(tmp_path / "l.json", budget=PrivacyBudget(epsilon=one * 1.2)) as ledger:
        ledger.check(RUN)
        ledger.check(RUN)  # two callers both passed the check
        ledger.record(RUN, round=1, max_grad_norm=1.0)
        with pytest.raises(PrivacyBudgetExceeded):
            ledger.record(RUN, round=1, max_grad_norm=1.0)
        assert len(ledger.entries) == 1
