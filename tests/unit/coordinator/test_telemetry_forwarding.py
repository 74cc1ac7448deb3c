"""Telemetry forwards a rejection only to a reporter that declares RejectionReporter."""

from __future__ import annotations

import json

from fedpriv.coordinator.phases import RejectionReporter
from fedpriv.coordinator.telemetry import Telemetry


class _Rounds:
    def __init__(self) -> None:
        self.failed: list[int] = []

    def round_completed(self, summary) -> None:  # pragma: no cover - not reached here
        raise AssertionError("no round completes in this test")

    def round_failed(self, round: int, reason: str) -> None:
        self.failed.append(round)


class _RoundsAndRejections(_Rounds):
    def __init__(self) -> None:
        super().__init__()
        self.rejected: list[tuple[str, int, str]] = []

    def update_rejected(self, *, silo: str, round: int, reason: str, detail: str) -> None:
        self.rejected.append((silo, round, reason))


def test_a_rejection_reaches_a_rejection_reporter_and_the_log(tmp_path):
    inner = _RoundsAndRejections()
    assert isinstance(inner, RejectionReporter)
    telemetry = Telemetry(tmp_path, inner=inner)
    telemetry.update_rejected(silo="a", round=2, reason="bounds", detail="w: 1e30")
    assert inner.rejected == [("a", 2, "bounds")]
    (event,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert event["event"] == "update_rejected" and event["reason"] == "bounds"


def test_a_plain_round_reporter_gets_rounds_and_no_rejections(tmp_path):
    inner = _Rounds()
    assert not isinstance(inner, RejectionReporter)
    telemetry = Telemetry(tmp_path, inner=inner)
    telemetry.update_rejected(silo="a", round=2, reason="bounds", detail="w: 1e30")
    telemetry.round_failed(2, "too few results")
    assert inner.failed == [2]
