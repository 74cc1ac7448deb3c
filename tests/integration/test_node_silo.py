"""A silo in another language: the Node.js example (examples/node) from the .proto alone.

It joins a real coordinator, over mTLS and in plain text (where it names itself
with the fedpriv-silo metadata key), trains three rounds beside a Python silo,
and the coordinator's model is the mean of both silos' updates.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import numpy as np
import pytest

from fedpriv.coordinator import Coordinator, Store, read_checkpoint
from tests.conftest import ArrayClient
from tests.helpers import (
    CollectingReporter,
    make_config,
    require_privilege,
    silo_thread,
    wait_silos,
)

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "node"
ARRAYS = {"w": np.zeros((3, 5), np.float32), "b": np.zeros(7, np.float32)}


@pytest.fixture
def node():
    binary = shutil.which("node")
    installed = (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir()
    require_privilege(
        None
        if binary and installed
        else "node and examples/node/node_modules are needed (make test runs npm ci there)"
    )
    return binary


def _run(tmp_path, pki, node, *, insecure: bool):
    config = make_config(tmp_path, None if insecure else pki.root, ARRAYS, num_rounds=3)
    reporter = CollectingReporter()
    with Coordinator(config, insecure=insecure, reporter=reporter) as coordinator:
        address = f"127.0.0.1:{coordinator.port}"
        if insecure:
            credentials = ["--insecure", "--identity", "silo-node"]
        else:
            root = pki.root
            credentials = [
                "--ca",
                str(root / "ca.crt"),
                "--cert",
                str(root / "silo-a.crt"),
                "--key",
                str(root / "silo-a.key"),
            ]
        process = subprocess.Popen(
            [node, "silo.js", "--coordinator", address, "--step", "1.0", *credentials],
            cwd=EXAMPLE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            python_silo = ArrayClient(delta=3.0)
            with silo_thread(
                python_silo,
                port=coordinator.port,
                tls=None if insecure else pki.tls("silo-b"),
                insecure=insecure,
                identity="silo-python" if insecure else None,
            ) as outcome:
                assert coordinator.wait(timeout_s=120)
                wait_silos([outcome])
            _, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, stderr
    assert "federation finished" in stderr
    assert [s.accepted for s in reporter.completed] == [2, 2, 2]
    store = Store(config.state_dir)
    try:
        final = read_checkpoint(store.last_committed().checkpoint).arrays()
        silos = {silo for _, silo, outcome, _ in store.participants(3) if outcome == "accepted"}
    finally:
        store.close()
    # Three rounds of the mean of +1 (Node) and +3 (Python), equal weights.
    for name in ARRAYS:
        np.testing.assert_allclose(final[name], 6.0)
    return silos, stderr


def test_the_node_silo_trains_three_rounds_over_mtls(tmp_path, pki, node):
    silos, stderr = _run(tmp_path, pki, node, insecure=False)
    assert silos == {"silo-a", "silo-b"}
    assert "as silo=silo-a" in stderr  # the identity came from its certificate


def test_the_node_silo_names_itself_with_fedpriv_silo_in_plain_text(tmp_path, pki, node):
    silos, stderr = _run(tmp_path, pki, node, insecure=True)
    assert silos == {"silo-node", "silo-python"}
    assert "as silo=silo-node" in stderr
