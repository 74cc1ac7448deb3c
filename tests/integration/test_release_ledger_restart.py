"""The federation's epsilon survives a killed coordinator and an upgrade, to the last bit.

Real processes (the ``fedpriv`` command), real mTLS over a Unix socket, real
SQLite. A coordinator under central DP with adaptive clipping is killed by a
fault point in the middle of the federation (``FEDPRIV_FAULT=POINT@HIT,kill``),
restarted on the same state, and left to finish. Its release ledger
(``federation_releases``) then holds one release per round, and the epsilon it
reported for every round equals, with ``==``, the epsilon an uninterrupted run
reported for the same round, and the accountant's epsilon over the table's
releases. The adaptive norm carries over the kill: each round was clipped to the
norm the round before it chose.

In-process coordinators check the rest: a state folder from before the ledger
(the table dropped, the metric rows kept) resumes with the same epsilon, and
distributed DP's Skellam releases are rows too and compose over a restart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib
import sqlite3
from dataclasses import dataclass

import numpy as np
import pytest

from fedpriv.coordinator import Coordinator, SecAggConfig, Store
from fedpriv.coordinator.release_ledger import Mechanism, Release
from fedpriv.faults import FaultPoint
from fedpriv.privacy.accounting import GaussianSteps, account
from fedpriv.privacy.central import CentralDP
from tests.apps import RandomUpdateClient
from tests.conftest import SILOS as CONFTEST_SILOS
from tests.helpers import make_config, silo_thread, wait_silos
from tests.integration.test_central_dp import SILOS as THREE_SILOS
from tests.integration.test_central_dp import federation_metrics, run_federation
from tests.integration.test_secagg import SHAPES as SECAGG_SHAPES
from tests.processes import FAULT, processes, write_unix_federation

SILOS = ("silo-a", "silo-b")
NUM_ROUNDS = 4
DELTA = 1e-5
NOISE_MULTIPLIER = 0.5


@dataclass(frozen=True)
class Crash:
    point: FaultPoint
    hit: int
    committed: list[int]  # rounds committed when the coordinator dies


CRASHES = [
    # Hit 3 is round 2's checkpoint (hit 1 is round 0's): durable, its transaction
    # (round, metrics, release) not run. Round 2 is run again after the restart.
    Crash(FaultPoint.AFTER_CHECKPOINT_BEFORE_SQL, 3, [0, 1]),
    # Round 3 is summed and noised, its norm adapted, in memory only: under [dp]
    # round 2 was committed before round 3 opened.
    Crash(FaultPoint.AFTER_FOLD_BEFORE_COMMIT, 3, [0, 1, 2]),
]


def write_configs(tmp: pathlib.Path, pki_root: pathlib.Path) -> None:
    write_unix_federation(
        tmp,
        pki_root,
        SILOS,
        num_rounds=NUM_ROUNDS,
        coordinator_extra=f"""
[dp]
noise_multiplier = {NOISE_MULTIPLIER}
clip_norm = 100.0
adaptive = true
clipped_count_stddev = 1.0
delta = {DELTA}
""",
        silo_extra=lambda silo: (
            """
[app]
delta = 0.01
"""
        ),
    )


@dataclass(frozen=True)
class Outcome:
    rows: dict[int, dict[str, float]]  # federation metrics, per round
    releases: list[Release]  # the ledger when the federation finished
    before: list[Release]  # the ledger when the coordinator had been killed
    log: str  # the last coordinator's stderr


def run(tmp: pathlib.Path, pki_root: pathlib.Path, crash: Crash | None) -> Outcome:
    """Run the federation in `tmp` (killed and restarted at `crash`); what it committed."""
    write_configs(tmp, pki_root)
    config = str(tmp / "coordinator.toml")
    before: list[Release] = []
    with processes(tmp) as running:
        env = None if crash is None else {"FEDPRIV_FAULT": f"{crash.point.value}@{crash.hit},kill"}
        coordinator = running.start("coordinator-1", "coordinator", "--config", config, env=env)
        coordinator.wait_for("coordinator listening")
        silos = [
            running.start(
                silo,
                "client",
                "--app",
                "tests.apps:make_client",
                "--config",
                str(tmp / f"{silo}.toml"),
            )
            for silo in SILOS
        ]
        if crash is not None:
            match = coordinator.wait_for(FAULT)
            assert (match.group(1), int(match.group(2))) == (crash.point.value, crash.hit)
            assert coordinator.wait() == -9
            store = Store(tmp / "state")
            assert store.rounds() == crash.committed
            before = store.releases.releases()
            store.close()
            coordinator = running.start("coordinator-2", "coordinator", "--config", config)
        assert coordinator.wait() == 0, coordinator.text()[-4000:]
        for silo in silos:
            assert silo.wait() == 0, silo.text()[-4000:]
        log = coordinator.text()
    rows, _ = federation_metrics(tmp / "state")
    store = Store(tmp / "state")
    releases = store.releases.releases()
    store.close()
    return Outcome(rows=rows, releases=releases, before=before, log=log)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, pki):
    return run(tmp_path_factory.mktemp("uninterrupted"), pki.root, None)


@pytest.mark.parametrize("crash", CRASHES, ids=lambda c: c.point.value)
def test_a_killed_coordinator_resumes_the_federation_epsilon_exactly(
    tmp_path, pki, uninterrupted, crash
):
    # Act: kill the coordinator at the fault point, restart it, let it finish
    resumed = run(tmp_path, pki.root, crash)
    releases, rows = resumed.releases, resumed.rows
    reference, reference_rows = uninterrupted.releases, uninterrupted.rows
    # Assert: one release per round, each recorded once; those committed before the
    # kill are unchanged, and the round that died with the process left none
    committed_before = crash.committed[-1]
    assert f"resuming after committed round={committed_before}" in resumed.log
    assert [r.round for r in resumed.before] == list(range(1, committed_before + 1))
    assert releases[:committed_before] == resumed.before
    assert [(r.round, r.mechanism) for r in releases] == [
        (round, Mechanism.GAUSSIAN) for round in range(1, NUM_ROUNDS + 1)
    ]
    assert [r.round for r in reference] == list(range(1, NUM_ROUNDS + 1))
    for round in range(1, NUM_ROUNDS + 1):
        # The federation's epsilon after each round, from the table, is the
        # uninterrupted run's, to the last bit ...
        from_table = account([r.to_accountant() for r in releases[:round]], delta=DELTA)
        uninterrupted_table = account([r.to_accountant() for r in reference[:round]], delta=DELTA)
        assert from_table.epsilon == uninterrupted_table.epsilon
        # ... and is what each coordinator reported for the round
        assert rows[round]["epsilon"] == from_table.epsilon
        assert reference_rows[round]["epsilon"] == from_table.epsilon
        history = [GaussianSteps(noise_multiplier=NOISE_MULTIPLIER, sample_rate=1.0, steps=1)]
        assert from_table.epsilon == account(history * round, delta=DELTA).epsilon
    # The adaptive norm carried over the kill: each round used the norm the last chose
    assert releases[0].clip_norm == 100.0
    for previous, release in zip(releases, releases[1:], strict=False):
        assert release.clip_norm == previous.next_clip_norm
        assert release.clip_norm != previous.clip_norm  # it did adapt
    assert [rows[r]["clip_norm"] for r in rows] == [r.clip_norm for r in releases]


def test_a_previous_versions_state_resumes_from_its_metric_rows_with_the_same_epsilon(
    tmp_path, pki, array_client, caplog
):
    # Arrange: two adaptive DP-FedAvg rounds, then the state as the previous version
    # left it: the same metric rows, and no release ledger
    dp = CentralDP(
        noise_multiplier=0.3,
        clip_norm=100.0,
        adaptive=True,
        clipped_count_stddev=0.2,
        expected_clients=3,
    )
    config = make_config(
        tmp_path,
        pki.root,
        {"w": np.zeros(1000, np.float32)},
        min_clients=3,
        num_rounds=2,
        federated_evaluation=False,
        dp=dp,
    )
    run_federation(config, pki, [array_client(delta=0.1) for _ in THREE_SILOS])
    with sqlite3.connect(config.state_dir / "state.sqlite3") as db:
        db.execute("DROP TABLE federation_releases")
    old_rows, _ = federation_metrics(config.state_dir)
    # Act: the new coordinator resumes on it and runs round 3
    again = dataclasses.replace(config, rounds=dataclasses.replace(config.rounds, num_rounds=3))
    with caplog.at_level(logging.INFO, logger="fedpriv.coordinator.release_ledger"):
        run_federation(again, pki, [array_client(delta=0.1) for _ in THREE_SILOS])
    # Assert: the old rows became releases once, and round 3 is accounted after them
    assert "release ledger migrated releases=2 rounds=1..2" in caplog.text
    rows, _ = federation_metrics(config.state_dir)
    store = Store(config.state_dir)
    releases = store.releases.releases()
    store.close()
    assert [r.round for r in releases] == [1, 2, 3]
    assert rows[1] == old_rows[1] and rows[2] == old_rows[2]
    history = [GaussianSteps(noise_multiplier=0.3, sample_rate=1.0, steps=1)] * 3
    assert rows[3]["epsilon"] == account(history, delta=1e-5).epsilon
    assert rows[3]["epsilon"] == account([r.to_accountant() for r in releases], delta=1e-5).epsilon
    assert releases[2].clip_norm == old_rows[2]["next_clip_norm"] == rows[3]["clip_norm"]


def test_distributed_dp_releases_are_skellam_rows_and_resume_after_a_restart(tmp_path, pki):
    # Arrange: secure aggregation with distributed DP, three silos, one colluder tolerated
    config = make_config(
        tmp_path,
        pki.root,
        {name: np.zeros(shape, np.float32) for name, shape in SECAGG_SHAPES.items()},
        min_clients=3,
        max_clients=3,
        num_rounds=1,
        federated_evaluation=False,
        chunk_bytes=16 << 10,
        dp=CentralDP(noise_multiplier=1.0, clip_norm=1.0, expected_clients=3),
    )
    config = dataclasses.replace(
        config, secure_aggregation=SecAggConfig(tolerate_colluders=1, unmask_deadline_s=15)
    )
    again = dataclasses.replace(config, rounds=dataclasses.replace(config.rounds, num_rounds=2))
    # Act: round 1, a new coordinator on the same state, round 2
    for run_config in (config, again):
        with Coordinator(run_config) as coordinator, contextlib.ExitStack() as stack:
            outcomes = [
                stack.enter_context(
                    silo_thread(RandomUpdateClient(i), port=coordinator.port, tls=pki.tls(name))
                )
                for i, name in enumerate(CONFTEST_SILOS[:3])
            ]
            assert coordinator.wait(timeout_s=120)
            wait_silos(outcomes)
    # Assert: one Skellam release per round, as the metric rows report it ...
    rows, _ = federation_metrics(config.state_dir)
    store = Store(config.state_dir)
    releases = store.releases.releases()
    store.close()
    assert [(r.round, r.mechanism, r.colluders_tolerated) for r in releases] == [
        (1, Mechanism.SKELLAM, 1),
        (2, Mechanism.SKELLAM, 1),
    ]
    for release in releases:
        row = rows[release.round]
        assert (release.skellam_mu, release.l1_sensitivity, release.l2_sensitivity) == (
            row["skellam_mu"],
            row["l1_sensitivity"],
            row["l2_sensitivity"],
        )
        assert release.clip_norm == row["clip_norm"] == 1.0
    # ... and round 2's epsilon, after the restart, composes both releases
    both = account([r.to_accountant() for r in releases], delta=DELTA)
    assert rows[2]["epsilon"] == both.epsilon
    assert rows[2]["epsilon"] > rows[1]["epsilon"]
