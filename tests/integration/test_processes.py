"""The CLI as users run it: separate processes, real certificates, kill -9 and restart."""

from __future__ import annotations

import pathlib
import signal
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from fedpriv.coordinator import Store, read_checkpoint
from fedpriv.privacy import GaussianSteps, epsilon
from tests.processes import FAULT, processes

ROOT = pathlib.Path(__file__).resolve().parents[2]


def fedpriv(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedpriv", *args]


def cli_pki(pki: pathlib.Path, silos: list[str]) -> None:
    """Create a CA, a coordinator certificate and silo certificates with the CLI."""
    commands = [
        ["pki", "init", "--dir", str(pki), "--federation", "proc"],
        ["pki", "issue", "coordinator", "--server", "--host", "127.0.0.1", "--dir", str(pki)],
        *(["pki", "issue", silo, "--client", "--dir", str(pki)] for silo in silos),
    ]
    for cmd in commands:
        subprocess.run(fedpriv(*cmd), check=True, cwd=ROOT, capture_output=True)


@pytest.fixture
def federation_dir(tmp_path):
    cli_pki(tmp_path / "pki", ["silo-1", "silo-2"])
    # A Unix socket: the restarted coordinator binds the same address, which no other
    # process can take while the first one is dead (a freed TCP port can be taken).
    socket = tmp_path / "coordinator.sock"
    (tmp_path / "coordinator.toml").write_text(f"""
[federation]
allowed_silos = ["silo-1", "silo-2"]
[server]
address = "unix:{socket}"
heartbeat_interval_s = 1
poll_wait_s = 2
[tls]
ca = "pki/ca.crt"
cert = "pki/coordinator.crt"
key = "pki/coordinator.key"
[rounds]
num_rounds = 5
min_clients = 2
deadline_s = 60
[model]
factory = "tests.apps:make_model"
[store]
dir = "state"
""")
    for k, delta in ((1, 1.0), (2, 3.0)):
        (tmp_path / f"silo-{k}.toml").write_text(f"""
[coordinator]
address = "unix:{socket}"
server_name = "127.0.0.1"  # the name in the coordinator's certificate
[tls]
ca = "pki/ca.crt"
cert = "pki/silo-{k}.crt"
key = "pki/silo-{k}.key"
[client]
poll_wait_s = 2
reconnect_timeout_s = 60
[app]
delta = {delta}
""")
    return tmp_path


def committed_rounds(db: pathlib.Path) -> list[int]:
    with sqlite3.connect(db) as conn:
        return [r for (r,) in conn.execute("SELECT round FROM rounds ORDER BY round")]


def test_coordinator_killed_mid_federation_resumes_without_losing_rounds(federation_dir):
    # Arrange
    work = federation_dir
    with processes(work) as running:
        # Killed by its own fault point once round 3 is summed, before any of it is written.
        coordinator = running.start(
            "coordinator-1",
            "coordinator",
            "--config",
            str(work / "coordinator.toml"),
            env={"FEDPRIV_FAULT": "after-fold-before-commit@3,kill"},
        )
        silos = [
            running.start(
                f"silo-{k}",
                "client",
                "--app",
                "tests.apps:make_client",
                "--config",
                str(work / f"silo-{k}.toml"),
            )
            for k in (1, 2)
        ]
        # Act: the kill, then a restart with the same config
        assert coordinator.wait_for(FAULT).group(1) == "after-fold-before-commit"
        assert coordinator.wait() == -signal.SIGKILL
        killed_after = committed_rounds(work / "state" / "state.sqlite3")
        coordinator = running.start(
            "coordinator-2", "coordinator", "--config", str(work / "coordinator.toml")
        )
        assert coordinator.wait() == 0, coordinator.text()
        codes = [s.wait() for s in silos]
    # Assert: every round committed exactly once; the model holds 5 rounds of +2
    assert codes == [0, 0]
    assert killed_after == [0, 1, 2]
    assert "resuming after committed round=2" in coordinator.text()
    store = Store(work / "state")
    assert store.rounds() == [0, 1, 2, 3, 4, 5]
    last = store.last_committed()
    final = read_checkpoint(last.checkpoint, sha256=last.sha256).arrays()
    store.close()
    np.testing.assert_array_equal(final["w"], np.full((64, 32), 10.0, np.float32))
    # The resumed coordinator printed only the rounds it ran, starting after the last commit.
    out = "".join(coordinator.stdout)
    printed = [int(line.split()[0]) for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert printed == [3, 4, 5]


@pytest.fixture(scope="module")
def plain_demo(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], pathlib.Path]:
    """One run of the digits demo (5 rounds), shared by the tests that read it."""
    workdir = tmp_path_factory.mktemp("plain") / "demo"
    result = subprocess.run(
        [sys.executable, "examples/digits/demo.py", "--rounds", "5", "--workdir", str(workdir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result, workdir


def test_digits_demo_reaches_90_percent_and_exits_cleanly(plain_demo):
    result, workdir = plain_demo
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert sum(1 for line in lines if line.strip()[:1].isdigit()) == 5
    final = [line for line in lines if line.startswith("final accuracy:")]
    assert final and float(final[0].split(":")[1]) >= 0.90
    assert "all processes exited cleanly" in result.stdout
    # Without a terminal each silo logs one line per local epoch (3 a round).
    silo_log = (workdir / "logs" / "silo-1.log").read_text()
    assert silo_log.count("round 5 epoch ") == 3 and "round 5 epoch 3/3 loss " in silo_log


def test_private_digits_demo_reaches_85_percent_with_every_silo_under_epsilon_4(tmp_path):
    result = subprocess.run(
        [sys.executable, "examples/digits/demo.py", "--dp", "--workdir", str(tmp_path / "demo")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    final = [line for line in lines if line.startswith("final accuracy:")]
    assert final and float(final[0].split(":")[1]) >= 0.85
    epsilons = [
        float(line.split()[2])
        for line in lines
        if line.startswith("silo-") and " epsilon: " in line
    ]
    assert len(epsilons) == 3 and all(0 < e <= 4.0 for e in epsilons)
    assert all("(delta 1e-05" in line for line in lines if " epsilon: " in line)
    # Silo-level DP-FedAvg ran too: the printed federation epsilon is the stored one,
    # recomputed here from the stored noise multipliers.
    federation = [line for line in lines if line.startswith("federation epsilon:")]
    assert len(federation) == 1
    store = Store(tmp_path / "demo" / "state")
    rows: dict[int, dict[str, float]] = {}
    for round, _, name, value in store.metrics(source="federation"):
        rows.setdefault(round, {})[name] = value
    store.close()
    assert sorted(rows) == [1, 2, 3, 4, 5]
    history = [
        GaussianSteps(noise_multiplier=r["noise_multiplier"], sample_rate=1.0, steps=1)
        for r in rows.values()
    ]
    assert float(federation[0].split()[2]) == pytest.approx(epsilon(history, delta=1e-5), abs=1e-3)


def test_digits_demo_with_dp_and_secure_aggregation_reaches_85_percent(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "examples/digits/demo.py",
            "--dp",
            "--secagg",
            "--workdir",
            str(tmp_path / "demo"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    final = [line for line in lines if line.startswith("final accuracy:")]
    assert final and float(final[0].split(":")[1]) >= 0.85
    assert any(line.startswith("federation epsilon:") for line in lines)
    # The coordinator summed masked updates: every round was unmasked with all three silos.
    store = Store(tmp_path / "demo" / "state")
    survivors = [v for _, _, name, v in store.metrics(source="federation") if name == "survivors"]
    store.close()
    assert survivors == [3.0] * 5


def _demo_accuracy(tmp_path, *extra: str) -> float:
    result = subprocess.run(
        [
            sys.executable,
            "examples/digits/demo.py",
            "--rounds",
            "5",
            *extra,
            "--workdir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    final = [line for line in result.stdout.splitlines() if line.startswith("final accuracy:")]
    return float(final[0].split(":")[1])


def test_int8_compressed_demo_stays_within_one_point_of_uncompressed(tmp_path, plain_demo):
    plain_result, plain_dir = plain_demo
    assert plain_result.returncode == 0, plain_result.stdout + plain_result.stderr
    plain = float(
        [line for line in plain_result.stdout.splitlines() if line.startswith("final accuracy:")][
            0
        ].split(":")[1]
    )
    int8 = _demo_accuracy(tmp_path / "int8", "--compression", "int8")
    assert int8 >= plain - 0.01, (plain, int8)
    db = sqlite3.connect(tmp_path / "int8" / "state" / "state.sqlite3")
    sent = db.execute(
        "SELECT SUM(bytes_received) FROM participants WHERE task = 'train'"
    ).fetchone()[0]
    db.close()
    db = sqlite3.connect(plain_dir / "state" / "state.sqlite3")
    full = db.execute(
        "SELECT SUM(bytes_received) FROM participants WHERE task = 'train'"
    ).fetchone()[0]
    db.close()
    assert sent < 0.26 * full  # a quarter, plus one 4-byte scale per chunk
