"""Adversarial silos and a lying relay in a real secure-aggregation round (gRPC, mTLS).

A silo that advertises an all-zero key, a silo that tampers with a share
ciphertext and a coordinator that relays an inconsistent roster each leave every
honest silo running. The round completes with the honest silos when enough of
them remain, or fails with no model published.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import re
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from fedpriv.coordinator import Coordinator, SecAggConfig, Store, read_checkpoint
from fedpriv.errors import FederationStopped, RoundFailed
from fedpriv.secagg import ClientSession, ServerSession, crypto
from fedpriv.transport import open_channel
from fedpriv.v1 import fleet_pb2, fleet_pb2_grpc
from tests.apps import RandomUpdateClient, make_model, random_update
from tests.conftest import SILOS
from tests.helpers import CollectingReporter, make_config, silo_thread
from tests.integration.test_processes import ROOT, cli_pki, fedpriv

SHAPES = {"w": (40, 10), "b": (10,)}


def secure_config(tmp_path, *, pki, threshold=3, min_clients=5, max_failed_attempts=1):
    config = make_config(
        tmp_path,
        pki.root,
        {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()},
        min_clients=min_clients,
        max_clients=5,
        num_rounds=1,
        federated_evaluation=False,
        min_results=threshold,
        max_failed_attempts=max_failed_attempts,
        chunk_bytes=1 << 10,
    )
    return dataclasses.replace(
        config, secure_aggregation=SecAggConfig(threshold=threshold, unmask_deadline_s=15)
    )


@contextlib.contextmanager
def honest_silos(port: int, pki, names, *, limits=None) -> Iterator[list[dict[str, Any]]]:
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(
                silo_thread(
                    RandomUpdateClient(SILOS.index(name)),
                    port=port,
                    tls=pki.tls(name),
                    limits=limits,
                )
            )
            for name in names
        ]


def assert_running_and_clean(outcomes: list[dict[str, Any]]) -> None:
    """Every silo thread still polls for tasks, or ended because the coordinator told it
    that the federation stopped; none crashed."""
    for outcome in outcomes:
        error = outcome.get("error")
        if error is not None:
            assert isinstance(error, FederationStopped), error
            assert "the coordinator stopped the federation" in str(error), error
        else:
            assert outcome["thread"].is_alive()


def assert_finished_cleanly(outcomes: list[dict[str, Any]], *, attempts: int = 1) -> None:
    """Every silo thread trained at each attempt and returned when the federation finished."""
    for outcome in outcomes:
        assert "error" not in outcome, outcome.get("error")
        assert 1 <= outcome["stats"].trained <= attempts


def committed_model(config) -> dict[str, np.ndarray] | None:
    store = Store(config.state_dir)
    committed = store.last_committed()
    store.close()
    if committed is None or committed.round < 1:
        return None
    return read_checkpoint(committed.checkpoint).arrays()


def participants(config) -> dict[str, tuple[str, str]]:
    store = Store(config.state_dir)
    rows = store.participants(1)
    store.close()
    return {silo: (outcome, detail) for task, silo, outcome, detail in rows if task == "train"}


def assert_mean_of(final: dict[str, np.ndarray], names) -> None:
    updates = [random_update(SILOS.index(name), SHAPES) for name in names]
    for key in SHAPES:
        np.testing.assert_allclose(
            final[key], np.mean([u[key] for u in updates], axis=0), atol=1e-6
        )


def assert_no_checkpoint(config) -> None:
    assert committed_model(config) is None
    assert not list((config.state_dir / "checkpoints").glob("round-000001*"))


def test_a_silo_advertising_the_all_zero_key_is_refused_and_the_round_completes_without_it(
    tmp_path, pki
):
    # Arrange: silo-e is driven by hand and advertises the all-zero (low-order) key
    config = secure_config(tmp_path, pki=pki)
    reporter = CollectingReporter()
    with (
        Coordinator(config, reporter=reporter) as coordinator,
        honest_silos(coordinator.port, pki, SILOS[:4]) as outcomes,
    ):
        channel = open_channel(f"127.0.0.1:{coordinator.port}", tls=pki.tls("silo-e"))
        stub = fleet_pb2_grpc.FleetStub(channel)
        stub.Join(fleet_pb2.JoinRequest(sdk_version="test"), timeout=10)
        task = None
        while task is None:
            first = next(iter(stub.PullTask(fleet_pb2.PullTaskRequest(wait_s=2), timeout=30)))
            if first.task.kind == fleet_pb2.TASK_KIND_TRAIN:
                task = first.task
        keys = fleet_pb2.AdvertiseKeys(
            cipher_public_key=bytes(32), mask_public_key=crypto.KeyPair().public_bytes
        )
        # Act
        with pytest.raises(grpc.RpcError) as refused:
            stub.SecAgg(
                fleet_pb2.SecAggRequest(task_id=task.task_id, round=1, advertise=keys), timeout=30
            )
        stub.Leave(fleet_pb2.LeaveRequest(reason="refused"), timeout=10)
        channel.close()
        assert coordinator.wait(timeout_s=120)
    assert_finished_cleanly(outcomes)
    # Assert: refused at the coordinator, the four honest silos' mean is committed
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "small order" in refused.value.details()
    assert_mean_of(committed_model(config), SILOS[:4])
    outcomes_by_silo = participants(config)
    assert outcomes_by_silo["silo-e"][0] == "rejected"
    assert "public key" in outcomes_by_silo["silo-e"][1]
    assert all(outcomes_by_silo[name][0] == "accepted" for name in SILOS[:4])


def test_a_relay_that_hands_out_an_all_zero_key_fails_the_round_safely(tmp_path, pki, monkeypatch):
    # Arrange: the coordinator replaces silo-e's cipher key with zeros in what it relays
    original = ServerSession.advertise

    def lying_advertise(self, silo, task_id, *, cipher_key, mask_key, **rest):
        peers = original(self, silo, task_id, cipher_key=cipher_key, mask_key=mask_key, **rest)
        peers["silo-e"] = (bytes(32), peers["silo-e"][1])
        return peers

    monkeypatch.setattr(ServerSession, "advertise", lying_advertise)
    config = secure_config(tmp_path, pki=pki)
    # Act
    with (
        Coordinator(config) as coordinator,
        honest_silos(coordinator.port, pki, SILOS) as outcomes,
    ):
        with pytest.raises(RoundFailed):
            coordinator.wait(timeout_s=120)
        # Assert: every honest silo is still serving, and nothing was published
        assert_running_and_clean(outcomes)
    assert_no_checkpoint(config)
    reasons = " ".join(detail for _, detail in participants(config).values())
    assert "silo-e" in reasons


def tamper_shares(monkeypatch, *, sender: str, victims: set[str]) -> None:
    """Make `sender` flip one byte of the share ciphertexts it addresses to `victims`."""
    original = ClientSession.share

    def share(self):
        out = original(self)
        if self.silo == sender:
            for victim in victims & set(out):
                sealed = bytearray(out[victim])
                sealed[-1] ^= 0x01
                out[victim] = bytes(sealed)
        return out

    monkeypatch.setattr(ClientSession, "share", share)


def test_a_tampered_share_is_reported_and_the_round_completes_from_the_other_shares(
    tmp_path, pki, monkeypatch, caplog
):
    # Arrange: silo-e tampers with the share it sends silo-a
    tamper_shares(monkeypatch, sender="silo-e", victims={"silo-a"})
    config = secure_config(tmp_path, pki=pki)
    caplog.set_level("WARNING")
    # Act
    with (
        Coordinator(config) as coordinator,
        honest_silos(coordinator.port, pki, SILOS) as outcomes,
    ):
        assert coordinator.wait(timeout_s=120)
    assert_finished_cleanly(outcomes)
    # Assert: t other shares of silo-e's seed unmask the sum exactly
    assert_mean_of(committed_model(config), SILOS)
    reported = [
        r.getMessage()
        for r in caplog.records
        if "silo=silo-a" in r.getMessage() and "invalid_share_from=silo-e" in r.getMessage()
    ]
    assert reported, [r.getMessage() for r in caplog.records]


def test_a_silo_tampering_with_every_share_fails_the_round_safely(tmp_path, pki, monkeypatch):
    # Arrange: silo-e tampers with every share it sends: no silo can reveal its seed
    tamper_shares(monkeypatch, sender="silo-e", victims=set(SILOS))
    config = secure_config(tmp_path, pki=pki)
    # Act
    with (
        Coordinator(config) as coordinator,
        honest_silos(coordinator.port, pki, SILOS) as outcomes,
    ):
        with pytest.raises(RoundFailed) as failed:
            coordinator.wait(timeout_s=120)
        assert_running_and_clean(outcomes)
    # Assert
    assert "silo-e" in str(failed.value)
    assert_no_checkpoint(config)


def test_a_silo_tampering_with_every_share_is_benched_and_the_retry_completes_without_it(
    tmp_path, pki, monkeypatch
):
    # Arrange: silo-e tampers with every share; rounds of 4 or 5 silos, two attempts
    tamper_shares(monkeypatch, sender="silo-e", victims=set(SILOS))
    config = secure_config(tmp_path, pki=pki, min_clients=4, max_failed_attempts=2)
    reporter = CollectingReporter()
    with (
        Coordinator(config, reporter=reporter) as coordinator,
        silo_thread(RandomUpdateClient(4), port=coordinator.port, tls=pki.tls("silo-e")) as bad,
    ):
        federation = coordinator.federation
        with federation.cond:  # test-only: silo-e is sure to be in the first attempt
            assert federation.cond.wait_for(lambda: "silo-e" in federation.available(), 30)
        # Act
        with honest_silos(coordinator.port, pki, SILOS[:4]) as outcomes:
            assert coordinator.wait(timeout_s=120)
    # Assert: the first attempt failed naming silo-e; the second is the honest silos' mean
    assert_finished_cleanly(outcomes, attempts=2)
    assert "error" not in bad, bad.get("error")
    assert len(reporter.failed) == 1 and "silo-e" in reporter.failed[0][1]
    assert_mean_of(committed_model(config), SILOS[:4])


def test_a_roster_that_grows_is_refused_by_every_silo_and_no_model_is_published(
    tmp_path, pki, monkeypatch, caplog
):
    # Arrange: the coordinator names a survivor that never took part
    original = ServerSession.roster

    def growing_roster(self, silo, task_id, *, until):
        survivors, dropped = original(self, silo, task_id, until=until)
        return sorted([*survivors, "silo-x"]), dropped

    monkeypatch.setattr(ServerSession, "roster", growing_roster)
    config = secure_config(tmp_path, pki=pki)
    reporter = CollectingReporter()
    caplog.set_level("WARNING", logger="fedpriv.secagg.server")
    # Act
    with (
        Coordinator(config, reporter=reporter) as coordinator,
        honest_silos(coordinator.port, pki, SILOS) as outcomes,
    ):
        with pytest.raises(RoundFailed):
            coordinator.wait(timeout_s=120)
        assert_running_and_clean(outcomes)
    # Assert: every silo declined with the reason (so the coordinator stopped waiting
    # for its reveal), none revealed anything, and the round failed without a model
    withdrawn = {
        r.args[1]
        for r in caplog.records
        if r.getMessage().startswith("secagg withdrawn") and "outside this round" in r.getMessage()
    }
    assert withdrawn == set(SILOS)
    assert_no_checkpoint(config)
    assert reporter.failed and "0 silos revealed shares" in reporter.failed[0][1]


# ---- every party a separate process -------------------------------------------------------

PROCESS_SILOS = [f"silo-{i}" for i in range(5)]
ADVERSARY = "silo-4"


def start_federation(work, attack: str) -> tuple[dict[str, subprocess.Popen], pathlib.Path]:
    """A coordinator, four honest silos and `attack`'s silo, each its own process."""
    cli_pki(work / "pki", PROCESS_SILOS)
    (work / "coordinator.toml").write_text("""
secure_aggregation = true
[secagg]
threshold = 3
unmask_deadline_s = 30
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
min_results = 3
deadline_s = 60
federated_evaluation = false
max_failed_attempts = 1
[model]
factory = "tests.apps:make_model"
chunk_bytes = 2048
[store]
dir = "state"
""")
    logs = work / "logs"
    logs.mkdir()
    coordinator = subprocess.Popen(
        fedpriv("coordinator", "--config", str(work / "coordinator.toml")),
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )
    # The coordinator binds port 0 and says which port it got.
    port = None
    lines = []
    for line in coordinator.stdout:
        lines.append(line)
        found = re.search(r"coordinator listening port=(\d+)", line)
        if found:
            port = int(found.group(1))
            break
    assert port is not None, "".join(lines)
    (logs / "coordinator.log").write_text("".join(lines))

    def drain() -> None:
        with open(logs / "coordinator.log", "a") as log:
            for line in coordinator.stdout:
                log.write(line)

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    processes = {"coordinator": coordinator}
    drainers[coordinator.pid] = drainer
    for index, name in enumerate(PROCESS_SILOS):
        (work / f"{name}.toml").write_text(f"""
[coordinator]
address = "127.0.0.1:{port}"
[tls]
ca = "pki/ca.crt"
cert = "pki/{name}.crt"
key = "pki/{name}.key"
[client]
poll_wait_s = 2
reconnect_timeout_s = 60
[app]
index = {index}
""")
        args = ["client", "--app", "tests.apps:make_random_client", "--config", f"{name}.toml"]
        cmd = (
            [sys.executable, "-m", "tests.adversary", attack, *args]
            if name == ADVERSARY
            else fedpriv(*args)
        )
        with open(logs / f"{name}.log", "w") as log:
            processes[name] = subprocess.Popen(
                cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=_env()
            )
    return processes, logs


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


drainers: dict[int, threading.Thread] = {}


def stop_all(processes: dict[str, subprocess.Popen]) -> None:
    for process in processes.values():
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stdout is not None:
            drainers.pop(process.pid).join(30)  # it stops at the end of the output
            process.stdout.close()


def process_participants(work) -> dict[str, str]:
    with sqlite3.connect(work / "state" / "state.sqlite3") as conn:
        rows = conn.execute(
            "SELECT silo, outcome FROM participants WHERE round = 1 AND task = 'train'"
        ).fetchall()
    return dict(rows)


def test_processes_a_zero_key_silo_is_refused_and_the_honest_silos_complete_the_round(tmp_path):
    # Arrange / Act
    processes, logs = start_federation(tmp_path, "zero-key")
    try:
        code = processes["coordinator"].wait(timeout=120)
        honest = {name: processes[name].wait(timeout=60) for name in PROCESS_SILOS[:4]}
    finally:
        stop_all(processes)
    log = (logs / "coordinator.log").read_text()
    # Assert: every honest silo ran to the end of the federation and exited cleanly
    assert code == 0, log
    for name, exit_code in honest.items():
        silo_log = (logs / f"{name}.log").read_text()
        assert exit_code == 0 and "Traceback" not in silo_log, silo_log
    assert "secagg refused round=1 silo=silo-4" in log and "small order" in log
    store = Store(tmp_path / "state")
    committed = store.last_committed()
    store.close()
    final = read_checkpoint(committed.checkpoint).arrays()
    shapes = {name: value.shape for name, value in make_model().items()}
    updates = [random_update(i, shapes) for i in range(4)]
    for key in shapes:
        np.testing.assert_allclose(
            final[key], np.mean([u[key] for u in updates], axis=0), atol=1e-6
        )
    outcomes = process_participants(tmp_path)
    assert outcomes[ADVERSARY] == "rejected"
    assert all(outcomes[name] == "accepted" for name in PROCESS_SILOS[:4])


def test_processes_a_silo_tampering_with_every_share_fails_the_round_and_nobody_crashes(tmp_path):
    # Arrange / Act
    processes, logs = start_federation(tmp_path, "tamper-all")
    try:
        code = processes["coordinator"].wait(timeout=120)
        # the coordinator tells every polling silo why it stopped before it exits
        honest = {name: processes[name].wait(timeout=60) for name in PROCESS_SILOS[:4]}
    finally:
        stop_all(processes)
    log = (logs / "coordinator.log").read_text()
    assert code != 0, log
    assert "cannot recover the secret of silo 'silo-4'" in log
    # Assert: each honest silo exits with status 1 and the reason, none with a traceback
    for name, exit_code in honest.items():
        silo_log = (logs / f"{name}.log").read_text()
        assert exit_code == 1, silo_log
        assert "the coordinator stopped the federation" in silo_log, silo_log
        assert "cannot recover the secret of silo 'silo-4'" in silo_log, silo_log
        assert "invalid_share_from=silo-4" in silo_log and "Traceback" not in silo_log, silo_log
    assert Store(tmp_path / "state").rounds() == [0]
    assert not list((tmp_path / "state" / "checkpoints").glob("round-000001*"))
