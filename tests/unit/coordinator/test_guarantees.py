"""The federation's claims, without gRPC: its silo-level guarantee and each silo's spend."""

from __future__ import annotations

import math

from fedpriv.coordinator.guarantees import FederationGuarantee, SpendGuard
from fedpriv.coordinator.privacy_record import RoundPrivacy, SiloSpend


def test_a_round_without_dp_makes_every_later_epsilon_none():
    guarantee = FederationGuarantee({1: RoundPrivacy.NONE}, claimed=True)
    released = guarantee.record(2, RoundPrivacy.CENTRAL, {"epsilon": 3.0, "delta": 1e-5})
    assert math.isinf(released["epsilon"]) and released["epsilon_dp_rounds"] == 3.0
    assert released["rounds_without_dp"] == 1.0
    assert guarantee.rounds_without_dp() == (1,)


def test_a_federation_that_never_claims_dp_reports_no_missing_rounds():
    guarantee = FederationGuarantee({1: RoundPrivacy.NONE}, claimed=False)
    assert guarantee.record(2, RoundPrivacy.NONE, {}) == {}
    assert guarantee.rounds_without_dp() == ()


def test_a_spend_that_goes_down_or_changes_delta_is_refused():
    guard = SpendGuard({"silo-a": SiloSpend(round=3, epsilon=2.0, delta=1e-5)})
    assert guard.problems("silo-a", {"epsilon": 2.5, "delta": 1e-5}) == []
    lower = guard.problems("silo-a", {"epsilon": 1.0, "delta": 1e-5})
    assert len(lower) == 1 and "below the 2" in lower[0]
    assert "delta" in guard.problems("silo-a", {"epsilon": 2.5, "delta": 1e-6})[0]
    assert "no epsilon reported" in guard.problems("silo-a", {})[0]
    guard.note(4, "silo-a", {"epsilon": 2.5, "delta": 1e-5})
    assert guard.problems("silo-a", {"epsilon": 2.2, "delta": 1e-5})
