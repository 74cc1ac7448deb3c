"""Whole federations over real gRPC on 127.0.0.1 with real mTLS and SQLite."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sqlite3
import threading

import numpy as np
import pytest

from fedpriv.coordinator import Coordinator, Store, read_checkpoint
from tests.helpers import CollectingReporter, make_config, silo_thread, wait_silos


class _CommittedWhenReported(CollectingReporter):
    """Records, at each report, which rounds the database holds as committed."""

    def __init__(self, database) -> None:
        super().__init__()
        self._database = database
        self.committed_at_report: list[list[int]] = []

    def round_completed(self, summary) -> None:
        with contextlib.closing(sqlite3.connect(self._database)) as db:
            rounds = [r for (r,) in db.execute("SELECT round FROM rounds ORDER BY round")]
        self.committed_at_report.append(rounds)
        super().round_completed(summary)


def test_two_silos_complete_rounds_and_model_is_weighted_average(tmp_path, pki, array_client):
    # Arrange
    arrays = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}
    config = make_config(tmp_path, pki.root, arrays, num_rounds=2, allowed=("silo-a", "silo-b"))
    reporter = CollectingReporter()
    # Act
    with Coordinator(config, reporter=reporter) as coordinator:
        with (
            silo_thread(
                array_client(delta=1.0, num_examples=10),
                port=coordinator.port,
                tls=pki.tls("silo-a"),
            ) as a,
            silo_thread(
                array_client(delta=4.0, num_examples=30),
                port=coordinator.port,
                tls=pki.tls("silo-b"),
            ) as b,
        ):
            assert coordinator.wait(timeout_s=60)
            stats = wait_silos([a, b])
    # Assert: each round adds (1*10 + 4*30) / 40 = 3.25
    assert [s.round for s in reporter.completed] == [1, 2]
    assert all(s.accepted == 2 for s in reporter.completed)
    assert reporter.completed[0].evaluation_metrics["accuracy"] == pytest.approx(0.5)
    store = Store(config.state_dir)
    committed = store.last_committed()
    assert committed is not None and committed.round == 2
    final = read_checkpoint(committed.checkpoint, sha256=committed.sha256).arrays()
    np.testing.assert_allclose(final["w"], np.full((4, 3), 6.5), rtol=1e-6)
    assert [s.silo for s in stats] == ["silo-a", "silo-b"]
    assert all(s.trained == 2 and s.evaluated == 2 for s in stats)
    store.close()


def test_model_larger_than_grpc_message_limit_completes_a_round(tmp_path, pki, array_client):
    # Arrange: 64 MB of float32 in three tensors, 16x gRPC's default 4 MiB message limit
    arrays = {
        "embed": np.zeros((4096, 2048), np.float32),
        "proj": np.ones((2048, 4096), np.float32),
        "bias": np.zeros(4099, np.float32),
    }
    assert sum(a.nbytes for a in arrays.values()) > 64e6
    config = make_config(
        tmp_path, pki.root, arrays, num_rounds=1, chunk_bytes=4 << 20, federated_evaluation=False
    )
    # Act
    with Coordinator(config) as coordinator:
        with (
            silo_thread(array_client(delta=2.0), port=coordinator.port, tls=pki.tls("silo-a")) as a,
            silo_thread(array_client(delta=4.0), port=coordinator.port, tls=pki.tls("silo-b")) as b,
        ):
            assert coordinator.wait(timeout_s=120)
            stats = wait_silos([a, b])
        final = coordinator.federation.model.arrays()
    # Assert
    np.testing.assert_array_equal(final["embed"], np.full((4096, 2048), 3.0, np.float32))
    np.testing.assert_array_equal(final["proj"], np.full((2048, 4096), 4.0, np.float32))
    assert all(s.bytes_sent > 64e6 and s.bytes_received > 64e6 for s in stats)


class _Retries(logging.Handler):
    """Wakes a waiter once `threads` silo threads have each failed to connect."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[str] = set()
        self.cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("coordinator unreachable"):
            with self.cond:
                self.threads.add(record.threadName)
                self.cond.notify_all()


def test_silo_started_before_coordinator_connects_with_backoff(tmp_path, pki, array_client):
    # A Unix socket: nothing listens until the coordinator starts, and no other
    # process can take the address meanwhile (as one could a TCP port freed for it).
    address = f"unix:{tmp_path / 'coordinator.sock'}"
    arrays = {"w": np.zeros(3, np.float32)}
    config = dataclasses.replace(
        make_config(tmp_path, pki.root, arrays, num_rounds=1), address=address
    )
    retries = _Retries()
    runtime = logging.getLogger("fedpriv.client.runtime")
    runtime.addHandler(retries)
    try:
        with (
            silo_thread(
                array_client(), port=None, address=address, server_name="localhost",
                tls=pki.tls("silo-a"),
            ) as a,
            silo_thread(
                array_client(), port=None, address=address, server_name="localhost",
                tls=pki.tls("silo-b"),
            ) as b,
        ):  # fmt: skip
            # Both silos found no coordinator and are backing off before it starts.
            with retries.cond:
                assert retries.cond.wait_for(lambda: len(retries.threads) >= 2, timeout=60)
            with Coordinator(config) as coordinator:
                assert coordinator.wait(timeout_s=60)
                stats = wait_silos([a, b])
    finally:
        runtime.removeHandler(retries)
    assert all(s is not None and s.trained == 1 for s in stats)
    assert all(s.reconnects >= 1 for s in stats)


def test_rounds_overlap_the_commit_yet_are_reported_only_once_durable(tmp_path, pki, array_client):
    # Arrange: no evaluation and no DP, so each round's checkpoint becomes durable
    # while the next round's silos download it.
    arrays = {"w": np.zeros(1000, np.float32)}
    config = make_config(tmp_path, pki.root, arrays, num_rounds=3, federated_evaluation=False)
    reporter = _CommittedWhenReported(config.state_dir / "state.sqlite3")
    # Act
    with Coordinator(config, reporter=reporter) as coordinator:
        with (
            silo_thread(array_client(delta=1.0), port=coordinator.port, tls=pki.tls("silo-a")),
            silo_thread(array_client(delta=3.0), port=coordinator.port, tls=pki.tls("silo-b")),
        ):
            assert coordinator.wait(timeout_s=60)
    # Assert: every report came after its round's commit, and the model chain is intact.
    assert [s.round for s in reporter.completed] == [1, 2, 3]
    assert [rounds[-1] for rounds in reporter.committed_at_report] == [1, 2, 3]
    store = Store(config.state_dir)
    assert store.rounds() == [0, 1, 2, 3]
    assert store.remove_orphans() == []
    for round in (1, 2, 3):
        checkpoint = store.checkpoint_path(round)
        np.testing.assert_allclose(read_checkpoint(checkpoint).arrays()["w"], 2.0 * round)
    store.close()


def test_keep_checkpoints_deletes_old_rounds_and_a_restart_resumes(tmp_path, pki, array_client):
    # Arrange: three rounds keeping every checkpoint, then a restart keeping one
    arrays = {"w": np.zeros(1000, np.float32)}
    config = make_config(tmp_path, pki.root, arrays, num_rounds=3, federated_evaluation=False)

    def run(coordinator: Coordinator) -> None:
        with coordinator:
            with (
                silo_thread(array_client(delta=1.0), port=coordinator.port, tls=pki.tls("silo-a")),
                silo_thread(array_client(delta=3.0), port=coordinator.port, tls=pki.tls("silo-b")),
            ):
                assert coordinator.wait(timeout_s=60)

    def on_disk() -> list[int]:
        return sorted(int(p.stem[6:]) for p in (config.state_dir / "checkpoints").iterdir())

    # Act
    run(Coordinator(config))
    kept_all = on_disk()
    restarted = Coordinator(
        dataclasses.replace(
            config,
            keep_checkpoints=1,
            rounds=dataclasses.replace(config.rounds, num_rounds=5),
        )
    )
    at_start = on_disk()  # pruned before any round runs
    run(restarted)
    # Assert: the folder keeps round 0 and the newest; the database keeps every round
    assert kept_all == [0, 1, 2, 3]
    assert at_start == [0, 3]
    assert on_disk() == [0, 5]
    store = Store(config.state_dir)
    assert store.rounds() == [0, 1, 2, 3, 4, 5]
    committed = store.last_committed()
    assert committed is not None and committed.round == 5
    final = read_checkpoint(committed.checkpoint, sha256=committed.sha256).arrays()["w"]
    np.testing.assert_allclose(final, 2.0 * 5)  # rounds 4 and 5 built on round 3's model
    store.close()
