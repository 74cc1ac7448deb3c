"""`fedpriv client` with a privacy ledger that was deleted or is read at another delta."""

from __future__ import annotations

import json
import subprocess

from fedpriv.coordinator import Coordinator
from fedpriv.privacy import GaussianSteps
from fedpriv.privacy.ledger import PrivacyBudget, PrivacyLedger
from tests.apps import make_model
from tests.helpers import make_config
from tests.integration.test_processes import ROOT, fedpriv


def silo_config(tmp_path, pki, *, port: int, delta: float = 1e-5):
    path = tmp_path / "silo-a.toml"
    path.write_text(f"""
[coordinator]
address = "127.0.0.1:{port}"
[tls]
ca = "{pki.root / "ca.crt"}"
cert = "{pki.root / "silo-a.crt"}"
key = "{pki.root / "silo-a.key"}"
[client]
poll_wait_s = 2
reconnect_timeout_s = 30
[privacy]
epsilon = 100.0
delta = {delta}
ledger = "ledger.json"
""")
    return path


def client(config, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fedpriv(
            "client", "--app", "tests.apps:make_private_client", "--config", str(config), *flags
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_deleted_or_other_delta_ledger_is_refused_and_reset_ledger_starts_over(tmp_path, pki):
    # Arrange: a silo whose ledger recorded two runs, then was deleted
    ledger = tmp_path / "ledger.json"
    run = GaussianSteps(noise_multiplier=2.0, sample_rate=0.2, steps=5)
    with PrivacyLedger.open(ledger, budget=PrivacyBudget(epsilon=100.0)) as kept:
        kept.record(run, round=1, max_grad_norm=1.0)
        kept.record(run, round=2, max_grad_norm=1.0)
    ledger_bytes = ledger.read_bytes()
    ledger.unlink()
    config = make_config(
        tmp_path, pki.root, make_model(), min_clients=1, federated_evaluation=False
    )
    with Coordinator(config) as coordinator:
        silo = silo_config(tmp_path, pki, port=coordinator.port)
        # Act / Assert: refused before it connects, saying what existed and what to do
        refused = client(silo)
        assert refused.returncode == 2, refused.stderr
        assert "fedpriv: error: privacy ledger" in refused.stderr
        assert "is missing" in refused.stderr and "2 runs recorded" in refused.stderr
        assert "--reset-ledger" in refused.stderr and not ledger.exists()
        # Act / Assert: the same ledger restored, read at another delta, is refused too
        ledger.write_bytes(ledger_bytes)
        other_delta = client(silo_config(tmp_path, pki, port=coordinator.port, delta=1e-3))
        assert other_delta.returncode == 2
        assert "was recorded at delta = 1e-05, but [privacy] delta = 0.001" in other_delta.stderr
        ledger.unlink()
        # Act: knowingly reset; the silo then trains the federation's one round
        reset = client(silo, "--reset-ledger")
        assert reset.returncode == 0, reset.stderr
        assert coordinator.wait(timeout_s=60)
    # Assert: a loud warning, and a new ledger holding only the new run
    assert "WARNING" in reset.stderr and "!!! --reset-ledger" in reset.stderr
    assert "no longer counted" in reset.stderr
    entries = json.loads(ledger.read_text())["entries"]
    assert [e["round"] for e in entries] == [1]
