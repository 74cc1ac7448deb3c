"""Secure aggregation with every party a separate process, silos killed after sending masked input."""

from __future__ import annotations

import signal
import sqlite3

import numpy as np
import pytest

from fedpriv.coordinator import Store, read_checkpoint
from tests.apps import make_model, random_update
from tests.integration.test_processes import cli_pki
from tests.processes import FAULT, processes

NAMES = [f"silo-{i}" for i in range(5)]
SHAPES = {name: value.shape for name, value in make_model().items()}


@pytest.fixture
def federation(tmp_path):
    cli_pki(tmp_path / "pki", NAMES)
    (tmp_path / "coordinator.toml").write_text("""
secure_aggregation = true
[secagg]
threshold = 3
unmask_deadline_s = 10
[server]
address = "127.0.0.1:0"
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
    return tmp_path


def write_silo_configs(work, port: int) -> None:
    for index, name in enumerate(NAMES):
        (work / f"{name}.toml").write_text(f"""
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
""")


def run(work, kill):
    """Start everything; the silos in `kill` die once their masked update is accepted.

    Each stops at its fault point (fedpriv.faults) after the coordinator accepted its
    masked input and before it reveals any share: the coordinator must rebuild its
    self mask from the survivors' shares.
    """
    fault = {"FEDPRIV_FAULT": "after-masked-upload-before-unmask,kill"}
    with processes(work) as running:
        coordinator, port = running.coordinator("coordinator", work / "coordinator.toml")
        write_silo_configs(work, port)
        silos = {
            name: running.start(
                name,
                "client",
                "--app",
                "tests.apps:make_random_client",
                "--config",
                str(work / f"{name}.toml"),
                env=fault if name in kill else None,
            )
            for name in NAMES
        }
        for name in kill:
            silos[name].wait_for(FAULT)
            assert silos[name].wait() == -signal.SIGKILL
        code = coordinator.wait()
    return code, coordinator.text()


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
