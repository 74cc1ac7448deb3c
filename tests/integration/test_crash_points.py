"""Kill a process at each named fault point, restart it, and check what survived.

Real processes (the ``fedpriv`` command), real mTLS, real SQLite, real ledgers.
The coordinator listens on a Unix socket in the test's folder: a restarted
coordinator binds the same address, and no other process can take it in
between, as one could take a TCP port freed by the kill. Each process is killed
by the fault point itself (``FEDPRIV_FAULT=POINT@HIT,kill``; see fedpriv.faults),
so the test knows exactly where it died, and waits on its output, never on a clock.

After the restart the federation finishes its rounds, and:
- every round committed before the kill is still committed, with the same
  row, checkpoint hash and metrics (nothing committed is lost or re-committed);
- each round has exactly one completed attempt (no round is committed twice);
- each silo's ledger still holds every run it recorded before the kill (no
  refund), holds exactly one entry per training run the silo's processes
  started (no double count), and the epsilon the coordinator committed for the
  silo's last round is the accountant's epsilon of that ledger.
"""

from __future__ import annotations

import json
import pathlib
import sqlite3
from dataclasses import dataclass

import numpy as np
import pytest

from fedpriv.coordinator import Store, read_checkpoint
from fedpriv.faults import FaultPoint
from fedpriv.privacy import GaussianSteps, epsilon
from tests.processes import FAULT, Processes, processes, write_unix_federation

SILOS = ("silo-a", "silo-b")
DELTAS = {"silo-a": 1.0, "silo-b": 3.0}
NUM_ROUNDS = 4
DELTA = 1e-5
TRAIN_TASK = r"task round=\d+ kind=TASK_KIND_TRAIN"


@dataclass(frozen=True)
class Crash:
    point: FaultPoint
    hit: int
    victim: str  # "coordinator" or a silo
    # Rounds committed when the process dies (None: it depends on how the commit of
    # the previous round, which overlaps the next round's downloads, raced the kill).
    committed: list[int] | None


CRASHES = [
    # Round 2 is summed; nothing of it is written. Round 1 was committed when round 2 opened.
    Crash(FaultPoint.AFTER_FOLD_BEFORE_COMMIT, 2, "coordinator", [0, 1]),
    # Hit 1 is round 0 (the initial model); hit 3 is round 2's checkpoint, renamed into
    # place, with no SQLite row: an orphan the restart removes.
    Crash(FaultPoint.AFTER_CHECKPOINT_BEFORE_SQL, 3, "coordinator", [0, 1]),
    # Each upload is 9 chunks of 1 KiB: hit 22 is inside one of round 2's two uploads.
    Crash(FaultPoint.DURING_UPLOAD, 22, "coordinator", None),
    # silo-b's second run (round 2) is in its ledger; none of its update was sent.
    Crash(FaultPoint.AFTER_LEDGER_RECORD_BEFORE_UPLOAD, 2, "silo-b", [0, 1]),
]


def write_configs(tmp: pathlib.Path, pki_root: pathlib.Path) -> None:
    write_unix_federation(
        tmp,
        pki_root,
        SILOS,
        num_rounds=NUM_ROUNDS,
        silo_extra=lambda silo: (
            f"""
[privacy]
epsilon = 100.0
delta = {DELTA}
ledger = "{tmp / f"{silo}-ledger.json"}"
[app]
delta = {DELTAS[silo]}
"""
        ),
    )


def start_silo(running: Processes, tmp: pathlib.Path, silo: str, name: str, env=None):
    return running.start(
        name,
        "client",
        "--app",
        "tests.apps:make_accounted_client",
        "--config",
        str(tmp / f"{silo}.toml"),
        env=env,
    )


def committed_state(db: pathlib.Path) -> dict[str, list[tuple]]:
    """The rows that make a round committed: rounds (with their hashes) and metrics."""
    with sqlite3.connect(db) as conn:
        return {
            "rounds": conn.execute("SELECT * FROM rounds ORDER BY round").fetchall(),
            "metrics": conn.execute(
                "SELECT * FROM metrics ORDER BY round, source, name"
            ).fetchall(),
        }


def ledger_entries(tmp: pathlib.Path, silo: str) -> list[dict]:
    path = tmp / f"{silo}-ledger.json"
    return json.loads(path.read_text())["entries"] if path.exists() else []


@pytest.mark.parametrize("crash", CRASHES, ids=lambda c: c.point.value)
def test_a_kill_at_each_fault_point_loses_nothing_committed_and_counts_each_spend_once(
    tmp_path, pki, crash
):
    # Arrange
    write_configs(tmp_path, pki.root)
    fault = {"FEDPRIV_FAULT": f"{crash.point.value}@{crash.hit},kill"}
    db = tmp_path / "state" / "state.sqlite3"
    with processes(tmp_path) as running:
        coordinator = running.start(
            "coordinator-1",
            "coordinator",
            "--config",
            str(tmp_path / "coordinator.toml"),
            env=fault if crash.victim == "coordinator" else None,
        )
        coordinator.wait_for("coordinator listening")
        silo_runs = {
            silo: [
                start_silo(
                    running,
                    tmp_path,
                    silo,
                    f"{silo}-1",
                    env=fault if crash.victim == silo else None,
                )
            ]
            for silo in SILOS
        }
        victim = coordinator if crash.victim == "coordinator" else silo_runs[crash.victim][0]
        # Act: the fault point kills its process; restart it on the same state
        match = victim.wait_for(FAULT)
        assert (match.group(1), int(match.group(2))) == (crash.point.value, crash.hit)
        assert victim.wait() == -9
        if crash.victim != "coordinator":
            # Round 1's commit overlaps round 2's downloads: wait for it to be durable
            # (the still running coordinator says so) before taking the "before" state.
            coordinator.wait_for(r"committed round=1 ")
        before = committed_state(db)
        ledgers_before = {silo: ledger_entries(tmp_path, silo) for silo in SILOS}
        if crash.victim == "coordinator":
            coordinator = running.start(
                "coordinator-2", "coordinator", "--config", str(tmp_path / "coordinator.toml")
            )
        else:
            silo_runs[crash.victim].append(
                start_silo(running, tmp_path, crash.victim, f"{crash.victim}-2")
            )
        assert coordinator.wait() == 0, coordinator.text()[-4000:]
        for runs in silo_runs.values():
            assert runs[-1].wait() == 0, runs[-1].text()[-4000:]
    # Assert: nothing committed before the kill was lost, changed or committed again
    after = committed_state(db)
    committed_before = [row[0] for row in before["rounds"]]
    if crash.committed is not None:
        assert committed_before == crash.committed
    assert set(before["rounds"]) <= set(after["rounds"])
    assert set(before["metrics"]) <= set(after["metrics"])
    assert [row[0] for row in after["rounds"]] == list(range(NUM_ROUNDS + 1))
    with sqlite3.connect(db) as conn:
        completed = conn.execute(
            "SELECT round, COUNT(*) FROM attempts WHERE outcome = 'completed' GROUP BY round"
        ).fetchall()
    assert completed == [(r, 1) for r in range(1, NUM_ROUNDS + 1)]
    if crash.victim == "coordinator":
        assert f"resuming after committed round={committed_before[-1]}" in coordinator.text()
    if crash.point is FaultPoint.AFTER_CHECKPOINT_BEFORE_SQL:
        assert "removed a checkpoint no round committed: round-000002" in coordinator.text()
    # ... and the model holds every round exactly once: each adds the mean delta, 2.0.
    store = Store(tmp_path / "state")
    last = store.last_committed()
    final = read_checkpoint(last.checkpoint, sha256=last.sha256).arrays()
    store.close()
    np.testing.assert_array_equal(final["w"], np.full((64, 32), 2.0 * NUM_ROUNDS, np.float32))
    # Assert: each silo's spend, before and after the kill
    for silo in SILOS:
        entries = ledger_entries(tmp_path, silo)
        # Never refunded: every run recorded before the kill is still there, unchanged.
        assert entries[: len(ledgers_before[silo])] == ledgers_before[silo]
        # Never double-counted: one entry per training run the silo's processes started.
        runs = sum(run.count(TRAIN_TASK) for run in silo_runs[silo])
        assert len(entries) == runs, (silo, [e["round"] for e in entries])
        spent = epsilon(
            [
                GaussianSteps(
                    noise_multiplier=e["noise_multiplier"],
                    sample_rate=e["sample_rate"],
                    steps=e["steps"],
                )
                for e in entries
            ],
            delta=DELTA,
        )
        # The coordinator committed the silo's own figure for its last round: the
        # accountant's epsilon of the whole ledger, at the same delta.
        reported = {
            (round, name): value
            for round, source, name, value in after["metrics"]
            if source == f"silo:{silo}"
        }
        assert reported[(NUM_ROUNDS, "epsilon")] == pytest.approx(spent, rel=1e-9)
        assert reported[(NUM_ROUNDS, "delta")] == DELTA
        epsilons = [reported[(r, "epsilon")] for r in range(1, NUM_ROUNDS + 1)]
        assert epsilons == sorted(epsilons)
    if crash.victim != "coordinator":
        # The killed run's spend (round 2) stays in the ledger; the restarted silo
        # trained round 2 again, and that run is recorded as a run of its own.
        rounds = [e["round"] for e in ledger_entries(tmp_path, crash.victim)]
        assert rounds == [1, 2, 2, 3, 4]
        assert [e["round"] for e in ledgers_before[crash.victim]] == [1, 2]
