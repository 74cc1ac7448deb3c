"""The tracking reporter: what it sends, and that no tracker can stall or crash the federation."""

from __future__ import annotations

import logging
import pathlib
import threading

import pytest

from fedpriv.coordinator import CoordinatorConfig, ModelSource, RoundSummary, TLSFiles
from fedpriv.coordinator.phases import RejectionReporter
from fedpriv.coordinator.privacy_record import RoundPrivacy
from fedpriv.coordinator.tracking import (
    MlflowSettings,
    RunStatus,
    Tracking,
    TrackingConfig,
    config_params,
    round_metrics,
)
from fedpriv.privacy.central import CentralDP

LOGGER = "fedpriv.coordinator.tracking.reporter"


def summary(round: int, **changes) -> RoundSummary:
    values = dict(
        round=round,
        num_rounds=3,
        selected=3,
        joined=3,
        accepted=2,
        rejected=1,
        dropped=0,
        declined=0,
        fit_metrics={"epsilon": 0.5 * round, "train_loss": 1.0 / round},
        evaluation_metrics={"accuracy": 0.25 * round},
        silo_metrics={
            "silo-a": {"epsilon": 0.5 * round, "delta": 1e-5, "train_loss": 0.3},
            "hospital b@eu": {"epsilon": 0.4 * round},
            "silo-c": {"train_loss": 0.7},
        },
        federation_metrics={"epsilon": 2.0 * round},
        bytes_received=1024,
        duration_s=1.5,
        privacy=RoundPrivacy.CENTRAL,
    )
    values.update(changes)
    return RoundSummary(**values)


class Recorder:
    """A sink that records every call; `fail_at` makes one kind of call raise."""

    def __init__(self, name: str = "recorder", *, fail_at: str | None = None) -> None:
        self.name = name
        self.fail_at = fail_at
        self.calls: list[tuple] = []
        self.closed = False

    def _call(self, kind: str, *args) -> None:
        if kind == self.fail_at:
            raise OSError(28, "No space left on device")
        self.calls.append((kind, *args))

    def start(self, params):
        self._call("start", dict(params))

    def log(self, step, values):
        self._call("log", step, dict(values))

    def end(self, status, *, detail):
        self._call("end", status, detail)

    def close(self):
        self.closed = True


class Hanging(Recorder):
    """A sink whose log blocks until released: a tracking server that does not answer."""

    def __init__(self) -> None:
        super().__init__("hanging")
        self.entered = threading.Event()
        self.release = threading.Event()

    def log(self, step, values):
        self.entered.set()
        self.release.wait(30)
        super().log(step, values)


class Rounds:
    def __init__(self) -> None:
        self.completed: list[int] = []
        self.failed: list[int] = []

    def round_completed(self, summary):
        self.completed.append(summary.round)

    def round_failed(self, round, reason):
        self.failed.append(round)


class RoundsAndRejections(Rounds):
    def __init__(self) -> None:
        super().__init__()
        self.rejected: list[str] = []

    def update_rejected(self, *, silo, round, reason, detail):
        self.rejected.append(silo)


def test_round_metrics_name_every_figure_and_only_each_silos_epsilon():
    values = round_metrics(summary(2))
    assert values == {
        "fit/epsilon": 1.0,
        "fit/train_loss": 0.5,
        "evaluate/accuracy": 0.5,
        "federation/epsilon": 4.0,
        "round/selected": 3.0,
        "round/accepted": 2.0,
        "round/rejected": 1.0,
        "round/dropped": 0.0,
        "round/declined": 0.0,
        "round/bytes_received": 1024.0,
        "round/duration_s": 1.5,
        "silo/silo-a/epsilon": 1.0,
        "silo/hospital_b_eu/epsilon": 0.8,
    }


def test_config_params_are_flat_keep_paths_and_leave_out_tracking():
    config = CoordinatorConfig(
        model=ModelSource(factory="pkg.mod:make"),
        state_dir=pathlib.Path("/var/fed/state"),
        tls=TLSFiles(
            ca=pathlib.Path("/pki/ca.crt"),
            cert=pathlib.Path("/pki/c.crt"),
            key=pathlib.Path("/pki/c.key"),
        ),
        allowed_silos=frozenset({"silo-b", "silo-a"}),
        dp=CentralDP(noise_multiplier=1.1, clip_norm=0.5),
        tracking=TrackingConfig(
            mlflow=MlflowSettings(tracking_uri="https://user:secret@mlflow.example")
        ),
    )
    params = config_params(config)
    assert params["rounds.num_rounds"] == "3"
    assert params["tls.key"] == "/pki/c.key"  # the path, never the key
    assert params["state_dir"] == "/var/fed/state"
    assert params["allowed_silos"] == "silo-a,silo-b"
    assert params["dp.noise_multiplier"] == "1.1"
    assert params["secure_aggregation"] == "none"
    assert params["rounds.update_compression"] == "none"
    assert params["rounds.client_config"] == "{}"
    assert not [k for k in params if k.startswith("tracking")]
    assert not [v for v in params.values() if "secret" in v]


def test_rounds_reach_every_sink_in_order_and_the_inner_reporter():
    # Arrange
    sink, inner = Recorder(), Rounds()
    tracking = Tracking([sink], params={"rounds.num_rounds": "3"}, inner=inner)
    # Act
    tracking.start()
    for r in (1, 2):
        tracking.round_completed(summary(r))
    tracking.round_failed(3, "too few updates")
    tracking.round_failed(3, "too few updates")
    tracking.round_completed(summary(3))
    tracking.end(RunStatus.FINISHED)
    tracking.close()
    # Assert
    kinds = [(c[0], c[1]) if c[0] == "log" else c[0] for c in sink.calls]
    assert kinds == [
        "start",
        ("log", 1),
        ("log", 2),
        ("log", 3),
        ("log", 3),
        ("log", 3),
        "end",
    ]
    assert sink.calls[0] == ("start", {"rounds.num_rounds": "3"})
    assert [c[2] for c in sink.calls[3:5]] == [
        {"round/failed_attempts": 1.0},
        {"round/failed_attempts": 2.0},
    ]
    assert sink.calls[-1] == ("end", RunStatus.FINISHED, "")
    assert sink.closed
    assert inner.completed == [1, 2, 3] and inner.failed == [3, 3]


def test_a_failing_sink_is_switched_off_with_one_warning_and_the_others_go_on(caplog):
    # Arrange
    broken, healthy = Recorder("broken", fail_at="log"), Recorder("healthy")
    tracking = Tracking([broken, healthy], params={})
    # Act
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tracking.start()
        for r in (1, 2, 3):
            tracking.round_completed(summary(r))
        tracking.end(RunStatus.FAILED, detail="round 4 failed 3 times")
        tracking.close()
    # Assert: one warning names the sink, the event and the error; the healthy sink got all
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "broken failed at round 1" in warnings[0]
    assert "No space left on device" in warnings[0] and "the federation goes on" in warnings[0]
    assert broken.closed and [c[0] for c in broken.calls] == ["start"]
    assert [c[0] for c in healthy.calls] == ["start", "log", "log", "log", "end"]
    assert healthy.calls[-1] == ("end", RunStatus.FAILED, "round 4 failed 3 times")
    assert tracking.sinks == ("healthy",)


def test_a_hanging_tracker_never_holds_up_the_round_loop(caplog):
    # Arrange: a tracker that does not answer, and room for two queued events
    sink = Hanging()
    tracking = Tracking([sink], params={}, queue_events=2, drain_timeout_s=0.2)
    # Act: round 1 reaches the tracker, which hangs in it; nine more rounds and the end follow
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tracking.start()
        tracking.round_completed(summary(1))
        assert sink.entered.wait(30), "the tracking thread never reached the sink"
        for r in range(2, 11):
            tracking.round_completed(summary(r))
        tracking.end(RunStatus.FINISHED)
        # every call above returned while the tracker was still stuck in round 1
        assert not sink.release.is_set() and [c[0] for c in sink.calls] == ["start"]
        tracking.close()
    # Assert: the overflow was dropped with one warning, and close gave up waiting
    # after its timeout with another.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "events behind; dropping round 4" in warnings[0]
    assert "did not catch up within" in warnings[1]
    # Once the tracker answers, what was queued goes through and a second close ends it.
    sink.release.set()
    tracking.close()
    assert sink.closed
    steps = [c[1] for c in sink.calls if c[0] == "log"]
    assert steps == [1, 2, 3]  # round 1, then the two that fitted; the rest were dropped


def test_rejections_are_forwarded_only_to_a_rejection_reporter():
    plain, wanting = Rounds(), RoundsAndRejections()
    assert not isinstance(plain, RejectionReporter) and isinstance(wanting, RejectionReporter)
    for inner in (plain, wanting):
        tracking = Tracking([], params={}, inner=inner)
        assert isinstance(tracking, RejectionReporter)
        tracking.update_rejected(silo="a", round=1, reason="bounds", detail="w: 1e30")
    assert wanting.rejected == ["a"]


@pytest.mark.parametrize("status", list(RunStatus))
def test_without_sinks_nothing_starts_and_events_are_only_forwarded(status):
    inner = Rounds()
    tracking = Tracking([], params={}, inner=inner)
    tracking.start()
    tracking.round_completed(summary(1))
    tracking.end(status)
    tracking.close()
    assert inner.completed == [1]
    assert tracking.sinks == ()
