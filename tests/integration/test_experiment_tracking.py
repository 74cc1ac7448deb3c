"""Experiment tracking over a real federation: MLflow's file store and TensorBoard event files.

Real gRPC over mTLS on loopback. Two silos train with a privacy ledger (the
runtime accounts each round and reports epsilon, as a DP-SGD silo does) and one
without; the coordinator adds central DP, so the federation has an epsilon of
its own. Afterwards the run is read back with MLflow's client and the event
files with TensorBoard's reader.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedpriv.coordinator import Coordinator
from fedpriv.coordinator.tracking import MlflowSettings, TensorBoardSettings, TrackingConfig
from fedpriv.coordinator.tracking.mlflow_sink import RUN_FILE
from fedpriv.errors import RoundFailed
from fedpriv.privacy import PrivacyBudget, PrivacyLedger
from fedpriv.privacy.central import CentralDP
from tests.apps import AccountedClient
from tests.conftest import ArrayClient
from tests.helpers import CollectingReporter, make_config, silo_thread, wait_silos

ARRAYS = {"w": np.zeros(16, np.float32)}
NUM_ROUNDS = 3
EXPERIMENT = "tracked-federation"
ROUND_KEYS = (
    "round/selected",
    "round/accepted",
    "round/rejected",
    "round/dropped",
    "round/declined",
    "round/duration_s",
    "round/bytes_received",
    "fit/epsilon",
    "evaluate/accuracy",
    "evaluate/loss",
    "federation/epsilon",
    "silo/silo-a/epsilon",
    "silo/silo-b/epsilon",
)


@pytest.fixture(autouse=True)
def allow_mlflow_file_store(monkeypatch):
    # MLflow 3 refuses its file store (maintenance mode) unless this is set; the
    # coordinator's tracking thread and the client below both read it.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def tracked(config, tmp, *, tensorboard=True, **mlflow):
    return dataclasses.replace(
        config,
        tracking=TrackingConfig(
            mlflow=MlflowSettings(
                tracking_uri=(tmp / "mlruns").as_uri(), experiment=EXPERIMENT, **mlflow
            ),
            tensorboard=TensorBoardSettings(log_dir=tmp / "tb") if tensorboard else None,
        ),
    )


def the_run(tmp):
    client = MlflowClient(tracking_uri=(tmp / "mlruns").as_uri())
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    [run] = client.search_runs([experiment.experiment_id])
    return client, run


def history(client, run, key):
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


@pytest.fixture
def dp_federation(tmp_path, pki):
    """Three rounds with two accounted silos and a plain one, central DP on, both sinks."""
    config = make_config(
        tmp_path,
        pki.root,
        ARRAYS,
        num_rounds=NUM_ROUNDS,
        min_clients=3,
        dp=CentralDP(noise_multiplier=1.0, clip_norm=1.0, expected_clients=3),
    )
    config = tracked(config, tmp_path, run_name="trial-1")
    reporter = CollectingReporter()
    budget = PrivacyBudget(epsilon=1000.0)
    with (
        PrivacyLedger.open(tmp_path / "a.json", budget=budget) as ledger_a,
        PrivacyLedger.open(tmp_path / "b.json", budget=budget) as ledger_b,
        Coordinator(config, reporter=reporter) as coordinator,
    ):
        port = coordinator.port
        with (
            silo_thread(
                AccountedClient(1.0), port=port, tls=pki.tls("silo-a"), ledger=ledger_a
            ) as a,
            silo_thread(
                AccountedClient(0.5), port=port, tls=pki.tls("silo-b"), ledger=ledger_b
            ) as b,
            silo_thread(ArrayClient(), port=port, tls=pki.tls("silo-c")) as c,
        ):
            assert coordinator.wait(timeout_s=120)
            wait_silos([a, b, c])
    assert [s.round for s in reporter.completed] == [1, 2, 3]
    return config, reporter.completed


def test_mlflow_run_holds_the_config_every_round_and_each_silos_epsilon(tmp_path, dp_federation):
    # Arrange
    config, summaries = dp_federation
    # Act
    client, run = the_run(tmp_path)
    # Assert: one finished run, named and tagged, whose id the state folder keeps
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "trial-1"
    assert run.data.tags["fedpriv.federation"] == config.federation
    stored = json.loads((config.state_dir / RUN_FILE).read_text())
    assert stored == {"run_id": run.info.run_id}
    # ... the configuration as flat parameters: paths as paths, no tracking URI
    params = run.data.params
    assert params["rounds.num_rounds"] == str(NUM_ROUNDS)
    assert params["dp.noise_multiplier"] == "1.0"
    assert params["tls.key"] == str(config.tls.key)
    assert not [k for k in params if k.startswith("tracking")]
    # ... one value per round, at step = round, for every round metric
    for key in ROUND_KEYS:
        assert [step for step, _ in history(client, run, key)] == [1, 2, 3], key
    # ... each accounted silo's epsilon as it reported it, growing; none for the plain silo
    for silo in ("silo-a", "silo-b"):
        reported = [s.silo_metrics[silo]["epsilon"] for s in summaries]
        assert [v for _, v in history(client, run, f"silo/{silo}/epsilon")] == reported
        assert reported == sorted(reported) and reported[0] > 0
    assert "silo/silo-c/epsilon" not in run.data.metrics
    # ... the federation's own epsilon, and the participation counts
    federation = [s.federation_metrics["epsilon"] for s in summaries]
    assert [v for _, v in history(client, run, "federation/epsilon")] == federation
    assert [v for _, v in history(client, run, "round/accepted")] == [3.0, 3.0, 3.0]
    # ... and the final model's evaluation, at the last round
    last = summaries[-1]
    assert history(client, run, "final/evaluate/accuracy") == [
        (3, last.evaluation_metrics["accuracy"])
    ]
    assert history(client, run, "final/federation/epsilon") == [(3, federation[-1])]


def test_tensorboard_event_files_hold_the_same_scalars(tmp_path, dp_federation):
    # Arrange
    _, summaries = dp_federation
    events = EventAccumulator(str(tmp_path / "tb"))
    # Act
    events.Reload()
    # Assert
    scalars = set(events.Tags()["scalars"])
    assert set(ROUND_KEYS) <= scalars
    for key in ROUND_KEYS:
        assert [e.step for e in events.Scalars(key)] == [1, 2, 3], key
    reported = [s.silo_metrics["silo-a"]["epsilon"] for s in summaries]
    logged = [e.value for e in events.Scalars("silo/silo-a/epsilon")]
    assert logged == pytest.approx(reported, rel=1e-6)  # float32 in the event file
    federation = [e.value for e in events.Scalars("federation/epsilon")]
    assert federation == pytest.approx([s.federation_metrics["epsilon"] for s in summaries])
    [final] = events.Scalars("final/evaluate/accuracy")
    assert final.step == 3
    assert final.value == pytest.approx(summaries[-1].evaluation_metrics["accuracy"])
    [status] = events.Tensors("run/status")
    assert status.tensor_proto.string_val == [b"FINISHED"]
    [text] = events.Tensors("config")
    assert b"| rounds.num_rounds | 3 |" in text.tensor_proto.string_val[0]


class StopAfter(CollectingReporter):
    """Says when round `round` was reported, and holds the round loop there until
    `release` is set: no later round starts before the test has stopped the federation."""

    def __init__(self, round: int) -> None:
        super().__init__()
        self.round = round
        self.reached = threading.Event()
        self.release = threading.Event()

    def round_completed(self, summary) -> None:
        super().round_completed(summary)
        if summary.round == self.round:
            self.reached.set()
            self.release.wait(60)


def test_a_restarted_coordinator_continues_the_same_mlflow_run(tmp_path, pki):
    # Arrange
    config = make_config(tmp_path, pki.root, ARRAYS, num_rounds=4)
    config = tracked(config, tmp_path, tensorboard=False)
    first = StopAfter(2)
    # Act: stop the coordinator once round 2 is reported, then start it again
    with Coordinator(config, reporter=first) as coordinator:
        with (
            silo_thread(ArrayClient(), port=coordinator.port, tls=pki.tls("silo-a")),
            silo_thread(ArrayClient(), port=coordinator.port, tls=pki.tls("silo-b")),
        ):
            assert first.reached.wait(60)
            coordinator.federation.stop()  # before the loop may go on to round 3
            first.release.set()
    client, stopped = the_run(tmp_path)
    second = CollectingReporter()
    with Coordinator(config, reporter=second) as coordinator:
        with (
            silo_thread(ArrayClient(), port=coordinator.port, tls=pki.tls("silo-a")) as a,
            silo_thread(ArrayClient(), port=coordinator.port, tls=pki.tls("silo-b")) as b,
        ):
            assert coordinator.wait(timeout_s=120)
            wait_silos([a, b])
    # Assert: the stopped run was KILLED, and the same run (the only one) finished
    assert stopped.info.status == "KILLED"
    client, run = the_run(tmp_path)
    assert run.info.run_id == stopped.info.run_id
    assert run.info.status == "FINISHED"
    assert [s.round for s in first.completed] == [1, 2]
    assert [s.round for s in second.completed] == [3, 4]
    for key in ("round/accepted", "evaluate/accuracy", "round/duration_s"):
        assert [step for step, _ in history(client, run, key)] == [1, 2, 3, 4], key


def test_a_failing_tracker_is_switched_off_and_the_federation_completes(tmp_path, pki, caplog):
    # Arrange: TensorBoard's log_dir is a file, so its sink fails as it starts
    config = make_config(tmp_path, pki.root, ARRAYS, num_rounds=2)
    config = tracked(config, tmp_path)
    (tmp_path / "tb").write_text("not a folder")
    reporter = CollectingReporter()
    # Act
    with caplog.at_level(logging.WARNING, logger="fedpriv.coordinator.tracking"):
        with Coordinator(config, reporter=reporter) as coordinator:
            with (
                silo_thread(ArrayClient(), port=coordinator.port, tls=pki.tls("silo-a")) as a,
                silo_thread(ArrayClient(), port=coordinator.port, tls=pki.tls("silo-b")) as b,
            ):
                assert coordinator.wait(timeout_s=120)
                wait_silos([a, b])
    # Assert: every round completed, one warning named the sink, MLflow got everything
    assert [s.round for s in reporter.completed] == [1, 2]
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("fedpriv.coordinator.tracking")
    ]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("tracking: tensorboard failed at start")
    client, run = the_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert [step for step, _ in history(client, run, "round/accepted")] == [1, 2]


class RaisingClient(ArrayClient):
    def fit(self, parameters, *, config):
        raise RuntimeError("no data today")


def test_a_failed_federation_ends_its_run_failed_with_the_reason(tmp_path, pki):
    # Arrange: every silo's fit raises, so round 1 fails and the coordinator gives up
    config = make_config(tmp_path, pki.root, ARRAYS, num_rounds=2, max_failed_attempts=1)
    config = tracked(config, tmp_path, tensorboard=False)
    # Act
    with Coordinator(config) as coordinator:
        with (
            silo_thread(RaisingClient(), port=coordinator.port, tls=pki.tls("silo-a")),
            silo_thread(RaisingClient(), port=coordinator.port, tls=pki.tls("silo-b")),
        ):
            with pytest.raises(RoundFailed):
                coordinator.wait(timeout_s=120)
    # Assert
    client, run = the_run(tmp_path)
    assert run.info.status == "FAILED"
    assert "round 1 failed 1 times" in run.data.tags["fedpriv.failure"]
    assert history(client, run, "round/failed_attempts") == [(1, 1.0)]
