"""One misconfigured silo: the round is called off with its reason, and no healthy silo pays.

Silo-2 has a privacy budget but a client without DP, so it declines every task.
Silo-1 is healthy and DP-accounted; it is still training when silo-2 declines.
Real gRPC over mTLS, real ledgers. Before the fix, silo-1 was labelled
``timeout`` at once, recorded a spend for an update nobody took, and each retry
(with no backoff) cost it again.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpriv.coordinator import Coordinator, Store
from fedpriv.privacy import PrivacyBudget, PrivacyLedger
from tests.apps import AccountedClient, DeltaClient
from tests.helpers import CollectingReporter, make_config, silo_thread, wait_silos

ARRAYS = {"w": np.zeros((4, 3), np.float32)}


class HeldClient(AccountedClient):
    """Trains only once `release` is set (a fault-injection point: no sleeps)."""

    def __init__(self, release: threading.Event) -> None:
        super().__init__(1.0)
        self.release = release
        self.started = threading.Event()

    def fit(self, parameters: Mapping[str, Any], *, config: Mapping[str, Any]) -> Any:
        self.started.set()
        assert self.release.wait(60), "the test never released the fit"
        return super().fit(parameters, config=config)


class NoDPClient(DeltaClient):
    """Declares no DP mechanism, but only once silo-1 is training (so the order is fixed)."""

    def __init__(self, after: threading.Event) -> None:
        super().__init__(3.0)
        self.after = after

    def plan_privacy(self, config: Mapping[str, Any]) -> Any:
        assert self.after.wait(60), "silo-1 never started training"
        return None


class FailedReporter(CollectingReporter):
    def __init__(self) -> None:
        super().__init__()
        self.any_failed = threading.Event()

    def round_failed(self, round: int, reason: str) -> None:
        super().round_failed(round, reason)
        self.any_failed.set()


def _ledger(tmp_path, name):
    return PrivacyLedger.open(
        tmp_path / f"{name}.json", budget=PrivacyBudget(epsilon=50.0, delta=1e-5)
    )


def test_a_declining_silo_calls_the_round_off_and_the_healthy_silo_spends_nothing(tmp_path, pki):
    config = make_config(
        tmp_path,
        pki.root,
        ARRAYS,
        num_rounds=1,
        min_clients=2,
        deadline_s=600.0,
        federated_evaluation=False,
    )
    reporter = FailedReporter()
    release = threading.Event()
    healthy = HeldClient(release)
    healthy_ledger = _ledger(tmp_path, "silo-a")
    with Coordinator(config, reporter=reporter) as coordinator:
        with silo_thread(
            healthy, port=coordinator.port, tls=pki.tls("silo-a"), ledger=healthy_ledger
        ) as silo_a:
            # Silo-2: a budget but no DP. It declines; the round cannot reach 2 results.
            misconfigured_ledger = _ledger(tmp_path, "silo-b")
            with silo_thread(
                NoDPClient(healthy.started),
                port=coordinator.port,
                tls=pki.tls("silo-b"),
                ledger=misconfigured_ledger,
            ):
                assert reporter.any_failed.wait(60)
                assert healthy.started.is_set()
                release.set()  # silo-1 finishes training after the round was called off
                # The federation now waits: silo-2 is left out of round 1's further attempts.
                store = Store(config.state_dir)
                try:
                    rows = store.participants(1)
                finally:
                    store.close()
            misconfigured_ledger.close()
            # The operator fixes silo-2 (it now trains with DP) and restarts it: it joins
            # again, takes part, and round 1 completes with both.
            fixed_ledger = _ledger(tmp_path, "silo-b-fixed")
            with silo_thread(
                AccountedClient(3.0),
                port=coordinator.port,
                tls=pki.tls("silo-b"),
                ledger=fixed_ledger,
            ) as silo_b:
                assert coordinator.wait(timeout_s=120)
                wait_silos([silo_a, silo_b])
            fixed_ledger.close()
    outcomes = {(silo, outcome): detail for _, silo, outcome, detail in rows}
    # Silo-2's reason is recorded; silo-1 is "cancelled", naming silo-2's reason, not
    # "timeout" or "late" long before its deadline.
    declined = outcomes[("silo-b", "declined")]
    assert "does not train with differential privacy" in declined
    cancelled = outcomes[("silo-a", "cancelled")]
    assert "called off before its deadline" in cancelled and "silo-b declined" in cancelled
    assert not {o for s, o in outcomes if s == "silo-a"} & {"timeout", "late"}
    # Silo-1 released nothing for the called-off attempt: one spend, for the round it
    # really contributed to.
    assert silo_a["stats"].withheld == 1
    assert [entry.round for entry in healthy_ledger.entries] == [1]
    healthy_ledger.close()
    assert [s.round for s in reporter.completed] == [1]
    assert reporter.completed[0].accepted == 2


def test_with_real_processes_the_federation_completes_and_the_healthy_ledger_is_exact(tmp_path):
    import json
    import re

    from tests.integration.test_processes import cli_pki
    from tests.processes import processes

    cli_pki(tmp_path / "pki", ["silo-1", "silo-2"])
    (tmp_path / "coordinator.toml").write_text("""
[server]
address = "127.0.0.1:0"
heartbeat_interval_s = 1
poll_wait_s = 2
[tls]
ca = "pki/ca.crt"
cert = "pki/coordinator.crt"
key = "pki/coordinator.key"
[rounds]
num_rounds = 3
min_clients = 1
deadline_s = 600
federated_evaluation = false
retry_backoff_s = 0.5
[model]
factory = "tests.apps:make_model"
[store]
dir = "state"
""")
    with processes(tmp_path) as running:
        coordinator, port = running.coordinator("coordinator", tmp_path / "coordinator.toml")
        for silo in ("silo-1", "silo-2"):
            (tmp_path / f"{silo}.toml").write_text(f"""
[coordinator]
address = "127.0.0.1:{port}"
[tls]
ca = "pki/ca.crt"
cert = "pki/{silo}.crt"
key = "pki/{silo}.key"
[client]
poll_wait_s = 2
[privacy]
epsilon = 100.0
ledger = "{silo}.ledger.json"
""")
        # Silo-2 first: a budget, but a client without DP. It declines round 1 alone.
        misconfigured = running.start(
            "silo-2",
            "client",
            "--app",
            "tests.apps:make_client",
            "--config",
            str(tmp_path / "silo-2.toml"),
        )
        coordinator.wait_for(re.escape("silo=silo-2 round=1 outcome=declined"))
        healthy = running.start(
            "silo-1",
            "client",
            "--app",
            "tests.apps:make_accounted_client",
            "--config",
            str(tmp_path / "silo-1.toml"),
        )
        assert coordinator.wait() == 0, coordinator.text()
        assert healthy.wait() == 0 and misconfigured.wait() == 0
    log = coordinator.text()
    # Silo-2 (joined and live) was left out of round 1's next attempt, which silo-1
    # then completed alone; from round 2 on it is offered tasks again.
    attempts = re.findall(r"\[TRAIN\] round=1 silos=(\S+)", log)
    assert attempts == ["silo-2", "silo-1"], log
    ledger = json.loads((tmp_path / "silo-1.ledger.json").read_text())
    assert [entry["round"] for entry in ledger["entries"]] == [1, 2, 3]
    store = Store(tmp_path / "state")
    try:
        rows = [row for r in (1, 2, 3) for row in store.participants(r)]
    finally:
        store.close()
    assert {outcome for _, silo, outcome, _ in rows if silo == "silo-1"} == {"accepted"}
    declined = [detail for _, silo, outcome, detail in rows if silo == "silo-2"]
    assert declined and all("does not train with differential privacy" in d for d in declined)


def test_when_the_coordinator_stops_the_federation_every_silo_exits_saying_why(tmp_path):
    import re

    from tests.integration.test_processes import cli_pki
    from tests.processes import processes

    cli_pki(tmp_path / "pki", ["silo-1", "silo-2"])
    (tmp_path / "coordinator.toml").write_text("""
[server]
address = "127.0.0.1:0"
heartbeat_interval_s = 1
poll_wait_s = 2
[tls]
ca = "pki/ca.crt"
cert = "pki/coordinator.crt"
key = "pki/coordinator.key"
[rounds]
num_rounds = 3
min_clients = 2
max_failed_attempts = 1
deadline_s = 600
[model]
factory = "tests.apps:make_model"
[store]
dir = "state"
""")
    with processes(tmp_path) as running:
        coordinator, port = running.coordinator("coordinator", tmp_path / "coordinator.toml")
        for silo, privacy in (("silo-1", ""), ("silo-2", 'epsilon = 8.0\nledger = "l.json"')):
            (tmp_path / f"{silo}.toml").write_text(f"""
[coordinator]
address = "127.0.0.1:{port}"
[tls]
ca = "pki/ca.crt"
cert = "pki/{silo}.crt"
key = "pki/{silo}.key"
[client]
poll_wait_s = 2
# Far longer than the test waits: a silo must not wait for the coordinator to vanish.
reconnect_timeout_s = 3600
[privacy]
{privacy}
""")
        silos = [
            running.start(
                silo,
                "client",
                "--app",
                "tests.apps:make_client",
                "--config",
                str(tmp_path / f"{silo}.toml"),
            )
            for silo in ("silo-1", "silo-2")
        ]
        # Silo-2 declines (a budget without DP); one failed attempt stops the federation.
        assert coordinator.wait() == 2
        codes = [silo.wait(timeout_s=30) for silo in silos]
    assert "failed 1 times in a row" in coordinator.text()
    assert codes == [1, 1]
    for silo in silos:
        text = silo.text()
        assert re.search(r"the coordinator stopped the federation: round 1 failed", text), text
        assert "unreachable" not in text
