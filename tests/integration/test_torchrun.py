"""One silo on two processes: torchrun, gloo, one connection to the coordinator (mTLS)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from fedpriv.coordinator import Coordinator, Store
from fedpriv.coordinator.audit import AuditKind, AuditLog
from fedpriv.privacy.ledger import PrivacyBudget, PrivacyLedger
from tests.ddp_app import BATCH, CLASSES, FEATURES, RECORDS
from tests.helpers import make_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
TORCHRUN = pathlib.Path(sys.executable).parent / "torchrun"


def silo_toml(
    tmp: pathlib.Path, pki_root: pathlib.Path, port: int, *, dp: bool, fail_round: int = 0
) -> pathlib.Path:
    privacy = '[privacy]\nepsilon = 100\ndelta = 1e-5\nledger = "ledger.json"\n' if dp else ""
    path = tmp / "silo.toml"
    path.write_text(
        f"""[coordinator]
address = "127.0.0.1:{port}"

[tls]
ca = "{pki_root / "ca.crt"}"
cert = "{pki_root / "silo-a.crt"}"
key = "{pki_root / "silo-a.key"}"

[client]
poll_wait_s = 2

[app]
out = "{tmp}"
dp = {str(dp).lower()}
fail_round = {fail_round}

{privacy}"""
    )
    return path


def run_torchrun(config: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(TORCHRUN),
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "fedpriv",
            "--log-level",
            "INFO",
            "client",
            "--app",
            "tests.ddp_app:make_client",
            "--config",
            str(config),
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.slow
@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
def test_two_processes_train_one_silo_over_one_connection(tmp_path, pki, dp):
    # Arrange
    arrays = {
        "weight": np.zeros((CLASSES, FEATURES), np.float32),
        "bias": np.zeros(CLASSES, np.float32),
    }
    config = make_config(tmp_path, pki.root, arrays, num_rounds=2, min_clients=1)
    # Act
    with Coordinator(config) as coordinator:
        done = run_torchrun(silo_toml(tmp_path, pki.root, coordinator.port, dp=dp))
        assert coordinator.wait(timeout_s=60)
    # Assert: both rounds committed, each from one silo, the only one that ever joined
    assert done.returncode == 0, done.stderr[-4000:]
    store = Store(config.state_dir)
    committed = store.last_committed()
    participants = {r: store.participants(r) for r in (1, 2)}
    store.close()
    assert committed is not None and committed.round == 2
    for rows in participants.values():
        train = [row for row in rows if row[0] == "train"]
        assert [(silo, outcome) for _, silo, outcome, _ in train] == [("silo-a", "accepted")], rows
    # one join, from one peer: rank 1 never connected
    log = AuditLog.open(config.state_dir)
    try:
        joins = log.entries(kinds={AuditKind.JOIN})
    finally:
        log.close()
    assert [(e.identity, e.kind) for e in joins] == [("silo-a", AuditKind.JOIN)], joins
    # rank 1 trained both rounds without a connection of its own
    assert "silo process 1 of 2: trained 2 rounds" in done.stderr
    # each rank read its own share: disjoint, together every record
    shares = [set(json.loads((tmp_path / f"rank-{r}.json").read_text())) for r in (0, 1)]
    if dp:  # under DP every rank reads record 0 once, for its shapes (no training)
        shares[1].discard(0)
    assert not shares[0] & shares[1]
    assert shares[0] <= set(range(0, RECORDS, 2)) and shares[1] <= set(range(1, RECORDS, 2))
    if not dp:
        assert shares[0] | shares[1] == set(range(RECORDS))
        return
    # with DP, the ledger's mechanism is that of the global batch: 2 ranks x 16 of 96
    with PrivacyLedger.open(tmp_path / "ledger.json", budget=PrivacyBudget(epsilon=100)) as ledger:
        entries = ledger.entries
    assert [e.round for e in entries] == [1, 2]
    for entry in entries:
        assert entry.sample_rate == pytest.approx(2 * BATCH / RECORDS)
        assert entry.steps == RECORDS // (2 * BATCH)


@pytest.mark.slow
def test_a_failed_round_on_rank_zero_ends_the_silo_instead_of_hanging_its_ranks(tmp_path, pki):
    # Rank 0's own code raises in round 2 while rank 1 waits for it in DDP's gradient
    # all-reduce: declining and going on would leave the ranks out of step for good.
    arrays = {
        "weight": np.zeros((CLASSES, FEATURES), np.float32),
        "bias": np.zeros(CLASSES, np.float32),
    }
    config = make_config(tmp_path, pki.root, arrays, num_rounds=3, min_clients=1)
    with Coordinator(config) as coordinator:
        done = run_torchrun(silo_toml(tmp_path, pki.root, coordinator.port, dp=False, fail_round=2))
        status = {s.name: s for s in coordinator.federation.status().silos}
    assert done.returncode != 0
    assert "rank 0's training failed (RuntimeError: the silo's data loader broke)" in done.stderr
    store = Store(config.state_dir)
    committed = store.last_committed()
    store.close()
    assert committed is not None and committed.round == 1  # round 1 stands; nothing after
    assert "silo-a" in status
