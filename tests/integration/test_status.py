"""`fedpriv status` against a running coordinator over mTLS: operators only, state as it changes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading

import numpy as np

from fedpriv.coordinator import Coordinator
from tests.conftest import ArrayClient
from tests.helpers import make_config, silo_thread, wait_silos
from tests.integration.test_processes import ROOT


class HeldClient(ArrayClient):
    """Trains the first round only once the test lets it: status is asked meanwhile."""

    def __init__(self, training: threading.Event, release: threading.Event) -> None:
        super().__init__()
        self.training = training
        self.release = release

    def fit(self, parameters, *, config):
        self.training.set()
        assert self.release.wait(60), "the test never released the round"
        return super().fit(parameters, config=config)


def status(
    tmp_path, pki, port: int | str, name: str, *flags: str
) -> subprocess.CompletedProcess[str]:
    address = port if isinstance(port, str) else f"127.0.0.1:{port}"
    # A Unix socket has no host name to check the certificate against.
    server_name = 'server_name = "localhost"\n' if address.startswith("unix:") else ""
    config = tmp_path / f"{name}.toml"
    config.write_text(
        f'[coordinator]\naddress = "{address}"\n{server_name}\n[tls]\n'
        f'ca = "{pki.root / "ca.crt"}"\ncert = "{pki.root / f"{name}.crt"}"\n'
        f'key = "{pki.root / f"{name}.key"}"\n'
    )
    return subprocess.run(
        [sys.executable, "-m", "fedpriv", "status", "--config", str(config), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_status_shows_an_operator_the_federation_and_refuses_silos(tmp_path, pki):
    # Arrange
    config = dataclasses.replace(
        make_config(
            tmp_path,
            pki.root,
            {"w": np.zeros(4, np.float32)},
            allowed=("silo-a", "silo-b"),
            num_rounds=3,
        ),
        operators=frozenset({"operator"}),
    )
    with Coordinator(config) as coordinator:
        port = coordinator.port
        # Act / Assert: before any silo joins
        health = status(tmp_path, pki, port, "operator", "--health")
        assert health.returncode == 0 and health.stdout.strip() == "SERVING", health.stderr
        waiting = status(tmp_path, pki, port, "operator")
        assert waiting.returncode == 0, waiting.stderr
        assert "state: waiting" in waiting.stdout and "round 1/3" in waiting.stdout
        assert "no silo has joined yet" in waiting.stdout
        denied = status(tmp_path, pki, port, "silo-a")
        assert denied.returncode == 2
        assert "'silo-a' is not an operator" in denied.stderr
        assert "[federation] operators" in denied.stderr
        # Act: ask while both silos are training round 1, then let the rounds run
        training = [threading.Event(), threading.Event()]
        release = threading.Event()
        with (
            silo_thread(HeldClient(training[0], release), port=port, tls=pki.tls("silo-a")) as a,
            silo_thread(HeldClient(training[1], release), port=port, tls=pki.tls("silo-b")) as b,
        ):
            assert all(event.wait(60) for event in training)
            during = status(tmp_path, pki, port, "operator", "--json")
            release.set()
            assert during.returncode == 0, during.stderr
            assert coordinator.wait(timeout_s=60)
            wait_silos([a, b])
        final = json.loads(status(tmp_path, pki, port, "operator", "--json").stdout)
    # Assert
    assert json.loads(during.stdout)["state"] == "training"
    assert final["state"] == "finished" and final["completed_rounds"] == 3
    assert [s["name"] for s in final["silos"]] == ["silo-a", "silo-b"]
    assert "train_loss" in final["last_round_metrics"]
    assert final["federation"] == config.federation and final["secure_aggregation"] is False


def test_status_reports_an_unreachable_coordinator_clearly(tmp_path, pki):
    # A Unix socket nobody listens on: unreachable for sure, unlike a freed TCP port.
    reply = status(tmp_path, pki, f"unix:{tmp_path / 'nobody.sock'}", "operator", "--timeout", "2")
    assert reply.returncode == 2
    assert reply.stderr.startswith("fedpriv: error:") and "Traceback" not in reply.stderr
