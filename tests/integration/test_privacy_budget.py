"""A silo's privacy budget is enforced by the silo, survives kill -9, and is reported."""

from __future__ import annotations

import json
import os
import pathlib
import sqlite3

import pytest

from fedpriv.privacy import GaussianSteps, epsilon
from tests.integration.test_processes import cli_pki
from tests.processes import processes

SIGMA, SAMPLE_RATE, STEPS = 2.0, 0.2, 5  # tests.apps.make_private_client: 100 examples, batch 20


def outcomes(db: pathlib.Path, silo: str) -> list[tuple[int, str]]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute(
                "SELECT round, outcome FROM participants WHERE silo = ? AND task = 'train' ORDER BY id",
                (silo,),
            ).fetchall()
        except sqlite3.OperationalError:
            return []


@pytest.fixture
def work(tmp_path):
    cli_pki(tmp_path / "pki", ["open-silo", "private-silo"])
    (tmp_path / "coordinator.toml").write_text("""
[server]
address = "127.0.0.1:0"
# The killed silo counts as live for 3 heartbeats (30 s), so its round-2 task is
# still open when the restarted process asks for it again.
heartbeat_interval_s = 10
poll_wait_s = 2
[tls]
ca = "pki/ca.crt"
cert = "pki/coordinator.crt"
key = "pki/coordinator.key"
[rounds]
num_rounds = 4
min_clients = 2
min_results = 1
deadline_s = 60
federated_evaluation = false
[model]
factory = "tests.apps:make_model"
[store]
dir = "state"
""")
    one = epsilon(
        [GaussianSteps(noise_multiplier=SIGMA, sample_rate=SAMPLE_RATE, steps=STEPS)], delta=1e-5
    )
    two = epsilon(
        [GaussianSteps(noise_multiplier=SIGMA, sample_rate=SAMPLE_RATE, steps=2 * STEPS)],
        delta=1e-5,
    )
    return tmp_path, one, two


def write_silo_configs(tmp_path, port: int, one: float, two: float) -> None:
    for name, extra in (
        ("open-silo", ""),
        (
            "private-silo",
            f'[privacy]\nepsilon = {(one + two) / 2}\ndelta = 1e-5\nledger = "ledger.json"\n',
        ),
    ):
        (tmp_path / f"{name}.toml").write_text(f"""
[coordinator]
address = "127.0.0.1:{port}"
[tls]
ca = "pki/ca.crt"
cert = "pki/{name}.crt"
key = "pki/{name}.key"
[client]
poll_wait_s = 2
reconnect_timeout_s = 60
{extra}""")


def test_tiny_budget_trains_once_then_refuses_even_after_kill_9(work):
    # Arrange
    tmp, one_round_epsilon, two_rounds_epsilon = work
    db = tmp / "state" / "state.sqlite3"
    private_args = (
        "client",
        "--app",
        "tests.apps:make_private_client",
        "--config",
        str(tmp / "private-silo.toml"),
    )
    with processes(tmp) as running:
        coordinator, port = running.coordinator("coordinator", tmp / "coordinator.toml")
        write_silo_configs(tmp, port, one_round_epsilon, two_rounds_epsilon)
        open_silo = running.start(
            "open",
            "client",
            "--app",
            "tests.apps:make_client",
            "--config",
            str(tmp / "open-silo.toml"),
        )
        # The first process trains round 1, then holds at round 2 (tests.apps' fault
        # injection point, before the budget check) until it is killed: the restarted
        # one meets rounds 2-4.
        config = tmp / "private-silo.toml"
        plain_config = config.read_text()
        fifo = tmp / "hold.fifo"
        os.mkfifo(fifo)
        config.write_text(plain_config + f'[app]\nhold_from_round = 2\nhold_fifo = "{fifo}"\n')
        private = running.start("private-1", *private_args)
        private.wait_for("^holding round 2")
        ledger_before = json.loads((tmp / "ledger.json").read_text())
        # Act: kill -9 the private silo, then start it again on the same ledger
        private.kill()
        config.write_text(plain_config)
        restarted = running.start("private-2", *private_args)
        assert coordinator.wait() == 0, coordinator.text()
        assert restarted.wait() == 0 and open_silo.wait() == 0
    # Assert: exactly one training run ever recorded; every later round refused
    ledger_after = json.loads((tmp / "ledger.json").read_text())
    assert len(ledger_before["entries"]) == 1
    assert ledger_after == ledger_before
    history = outcomes(db, "private-silo")
    assert history[0] == (1, "accepted")
    assert [o for _, o in history[1:]] == ["declined"] * (len(history) - 1) and len(history) == 4
    restarted = (tmp / "private-2.log").read_text()
    assert f"epsilon {one_round_epsilon:.4f}" in restarted  # the restarted silo read the same spend
    assert "privacy budget exceeded" in restarted
    with sqlite3.connect(db) as conn:
        details = [
            d for (d,) in conn.execute("SELECT detail FROM participants WHERE outcome = 'declined'")
        ]
        eps = conn.execute(
            "SELECT value FROM metrics WHERE source = 'silo:private-silo' AND name = 'epsilon'"
        ).fetchall()
    assert all("privacy budget exceeded" in d for d in details)
    assert eps == [(pytest.approx(one_round_epsilon),)]
