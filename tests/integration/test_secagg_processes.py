"""Secure aggregation with every party a separate process, silos killed after sending masked input."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time

import numpy as np
import pytest

from fedpriv.coordinator import Store, read_checkpoint
from tests.apps import make_model, random_update
from tests.integration.test_processes import ROOT, cli_pki, fedpriv, free_port

NAMES = [f"silo-{i}" for i in range(5)]
SHAPES = {name: value.shape for name, value in make_model().items()}


def accepted(db, silo):
    if not db.exists():
        return False
    try:
        with sqlite3.connect(db) as conn:
            row = conn.execute(
                "SELECT 1 FROM participants WHERE silo = ? AND task = 'train' AND outcome = 'accepted'",
                (silo,),
            ).fetchone()
    except sqlite3.OperationalError:
        return False
    return row is not None


@pytest.fixture
def federation(tmp_path):
    cli_pki(tmp_path / "pki", NAMES)
    port = free_port()
    (tmp_path / "coordinator.toml").write_text(f"""
secure_aggregation = true
[secagg]
threshold = 3
unmask_deadline_s = 10
[server]
address = "127.0.0.1:{port}"
heartbeat_interval_s = 1
poll_wait_s = 2
[tls]
ca = "pki/ca.crt"
cert = "pki/coordinator.crt"
key = "pki/coordinator.key"
[rounds]
num_rounds = 1
min_clients = 5
max_clients = 5
deadline_s = 60
federated_evaluation = false
max_failed_attempts = 1
[model]
factory = "tests.apps:make_model"
chunk_bytes = 2048
[store]
dir = "state"
""")
    for index, name in enumerate(NAMES):
        (tmp_path / f"{name}.toml").write_text(f"""
[coordinator]
address = "127.0.0.1:{port}"
[tls]
ca = "pki/ca.crt"
cert = "pki/{name}.crt"
key = "pki/{name}.key"
[client]
poll_wait_s = 2
reconnect_timeout_s = 30
[app]
index = {index}
sleep_s = {0.0 if index >= 2 else 4.0}
""")
    return tmp_path


def run(work, kill):
    """Start everything; SIGKILL the silos in `kill` as soon as their masked update is accepted."""
    logs = work / "logs"
    logs.mkdir()
    processes = {}
    for name in ["coordinator", *NAMES]:
        cmd = (
            fedpriv("coordinator", "--config", str(work / "coordinator.toml"))
            if name == "coordinator"
            else fedpriv(
                "client",
                "--app",
                "tests.apps:make_random_client",
                "--config",
                str(work / f"{name}.toml"),
            )
        )
        with open(logs / f"{name}.log", "w") as log:
            processes[name] = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    db = work / "state" / "state.sqlite3"
    pending = set(kill)
    deadline = time.monotonic() + 60
    try:
        while pending and time.monotonic() < deadline:
            for name in sorted(pending):
                if accepted(db, name):
                    processes[name].send_signal(signal.SIGKILL)
                    pending.discard(name)
            time.sleep(0.02)
        assert not pending, f"{pending} never had an update accepted"
        code = processes["coordinator"].wait(timeout=90)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
            process.wait()
    return code, (logs / "coordinator.log").read_text()


def test_two_silos_killed_after_masked_input_the_sum_is_still_exact(federation):
    code, log = run(federation, kill=["silo-3", "silo-4"])
    assert code == 0, log
    store = Store(federation / "state")
    committed = store.last_committed()
    participants = store.participants(1)
    store.close()
    assert committed is not None and committed.round == 1, log
    # The killed silos' updates are in the sum: their self masks were rebuilt from shares.
    assert sorted(s for task, s, outcome, _ in participants if outcome == "accepted") == NAMES
    final = read_checkpoint(committed.checkpoint).arrays()
    updates = [random_update(i, SHAPES) for i in range(5)]
    for name in SHAPES:
        expected = np.mean([u[name] for u in updates], axis=0)
        np.testing.assert_allclose(final[name], expected, atol=1e-6)


def test_below_threshold_the_round_fails_and_no_model_is_published(federation):
    code, log = run(federation, kill=["silo-2", "silo-3", "silo-4"])
    assert code != 0  # the coordinator gives up after max_failed_attempts
    store = Store(federation / "state")
    rounds = store.rounds()
    store.close()
    assert rounds == [0], log
    with sqlite3.connect(federation / "state" / "state.sqlite3") as conn:
        details = [
            d for (d,) in conn.execute("SELECT detail FROM attempts WHERE outcome = 'failed'")
        ]
    assert any("2 silos revealed shares, 3 needed" in d for d in details), details
    assert not list((federation / "state" / "checkpoints").glob("round-000001*"))
