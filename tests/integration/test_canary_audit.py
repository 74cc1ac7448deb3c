"""`fedpriv audit` on the digits silo, as a process: DP off leaks, DP on stays under its epsilon."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def audit(tmp_path, app: str, epochs: int, seed: int) -> dict[str, str]:
    config = tmp_path / "silo.toml"
    config.write_text(f"[app]\nsilo_index = 0\nnum_silos = 3\nepochs = {epochs}\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedpriv",
            "--log-level",
            "WARNING",
            "audit",
            "--app",
            app,
            "--config",
            str(config),
            "--rounds",
            "5",
            "--canaries",
            "1000",
            "--guesses",
            "200",
            "--seed",
            str(seed),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(line.split(": ", 1) for line in result.stdout.splitlines())


def number(text: str) -> float:
    return float(text.split()[0])


def test_audit_bound_separates_dp_off_from_dp_on_and_respects_the_accountant(tmp_path):
    for seed in (1, 2):
        # Six epochs a round: enough for the non-private model to memorise its canaries
        # (198/200 guesses right on seeds 1-3; with three epochs 185-194, too close to call).
        off = audit(tmp_path, "examples.digits.app:make_client", epochs=6, seed=seed)
        on = audit(tmp_path, "examples.digits.app:make_private_client", epochs=4, seed=seed)
        off_bound = number(off["empirical epsilon lower bound"])
        on_bound = number(on["empirical epsilon lower bound"])
        accountant = number(on["accountant epsilon"])
        assert off["accountant epsilon"].startswith("none")
        assert 0 < accountant <= 8.0
        assert on_bound <= accountant
        # Without DP the memorised canaries give the auditor a bound well above the DP run's.
        assert off_bound >= 3.0
        assert off_bound >= on_bound + 2.0


def test_audit_refuses_a_client_it_cannot_train(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fedpriv", "audit", "--app", "tests.apps:make_client"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "must return a fedpriv.TorchClient" in result.stderr


def test_audit_runs_on_the_app_fedpriv_init_writes(tmp_path):
    # init's app splits its data with random_split: a Subset, not a TensorDataset.
    target = tmp_path / "fed"
    subprocess.run(
        [sys.executable, "-m", "fedpriv", "init", str(target), "--silos", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedpriv",
            "audit",
            "--app",
            "app:make_client",
            "--config",
            "silo-1/silo.toml",
            "--canaries",
            "100",
            "--guesses",
            "20",
        ],
        cwd=target,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "empirical epsilon lower bound:" in result.stdout
