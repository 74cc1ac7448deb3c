"""Encrypted checkpoints and an encrypted silo ledger across restarts, over real mTLS gRPC."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
import threading
import tomllib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from fedpriv.atrest import AtRestKey, KeySource, is_sealed
from fedpriv.client import run_client
from fedpriv.client.config import ClientConfig
from fedpriv.coordinator import Coordinator, CoordinatorConfig, Store, read_checkpoint
from fedpriv.errors import ConfigError, IntegrityError
from fedpriv.privacy.accounting import GaussianSteps
from tests.conftest import ArrayClient
from tests.helpers import make_config, silo_thread

ROOT = pathlib.Path(__file__).resolve().parents[2]
LEDGER_KEY_ENV = "FEDPRIV_TEST_LEDGER_KEY"
# A tensor name that must not appear in any encrypted file.
NAME = "encoder_secret_projection.weight"
RUN = GaussianSteps(noise_multiplier=1.0, sample_rate=0.1, steps=50)

# A silo process that opens its ledger from its TOML config, key from the environment.
REOPEN = """
import pathlib, sys, tomllib
from fedpriv.client.config import ClientConfig
path = pathlib.Path(sys.argv[1])
config = ClientConfig.from_dict(tomllib.loads(path.read_text()), base_dir=path.parent)
with config.open_ledger() as ledger:
    print(",".join(str(e.round) for e in ledger.entries), round(ledger.spent_epsilon(), 6))
"""


class PrivateArrayClient(ArrayClient):
    """An array silo that declares a DP mechanism, so its runtime records each run."""

    def plan_privacy(self, config: Mapping[str, Any]) -> GaussianSteps:
        return RUN


def _silo_toml(tmp: pathlib.Path) -> pathlib.Path:
    path = tmp / "silo.toml"
    path.write_text(
        '[coordinator]\naddress = "127.0.0.1:1"\n'
        '[privacy]\nepsilon = 50.0\nledger = "silo/ledger.json"\n'
        f'encryption_key_env = "{LEDGER_KEY_ENV}"\n'
    )
    return path


def _run(config: CoordinatorConfig, pki: Any, silo_config: ClientConfig) -> None:
    """Serve the coordinator to a private silo (with its encrypted ledger) and a plain one."""
    ledger = silo_config.open_ledger()
    outcome: dict[str, Any] = {}
    stop = threading.Event()
    with Coordinator(config) as coordinator:

        def private() -> None:
            try:
                outcome["stats"] = run_client(
                    PrivateArrayClient(delta=1.0),
                    coordinator=f"127.0.0.1:{coordinator.port}",
                    tls=pki.tls("silo-a"),
                    poll_wait_s=2,
                    reconnect_timeout_s=30.0,
                    stop=stop,
                    ledger=ledger,
                )
            except Exception as err:  # recorded for the test to assert on
                outcome["error"] = err

        thread = threading.Thread(target=private, daemon=True)
        thread.start()
        try:
            # Weight 1, as the private silo (its count is not released under DP).
            plain = ArrayClient(delta=3.0, num_examples=1)
            with silo_thread(plain, port=coordinator.port, tls=pki.tls("silo-b")):
                assert coordinator.wait(timeout_s=60)
        finally:
            stop.set()
            thread.join(30)
    assert ledger is not None
    ledger.close()
    assert "error" not in outcome, outcome.get("error")


def test_encrypted_checkpoints_and_ledger_survive_a_restart(tmp_path, pki, monkeypatch):
    # Arrange: a state key in a file, a ledger key in the environment
    state_key = tmp_path / "state.key"
    state_key.write_text(AtRestKey.generate().to_text() + "\n")
    state_key.chmod(0o600)
    monkeypatch.setenv(LEDGER_KEY_ENV, AtRestKey.generate().to_text())
    silo_toml = _silo_toml(tmp_path)
    silo_config = ClientConfig.from_dict(tomllib.loads(silo_toml.read_text()), base_dir=tmp_path)
    arrays = {NAME: np.zeros(300_000, np.float32)}  # 1.2 MB: two encryption chunks
    config = dataclasses.replace(
        make_config(tmp_path, pki.root, arrays, num_rounds=2, federated_evaluation=False),
        encryption_key=KeySource(file=state_key),
    )
    # Act: two rounds, then a restart (new Coordinator, ledger opened afresh) for a third
    _run(config, pki, silo_config)
    after_two = sorted(p.name for p in (config.state_dir / "checkpoints").iterdir())
    _run(
        dataclasses.replace(config, rounds=dataclasses.replace(config.rounds, num_rounds=3)),
        pki,
        silo_config,
    )
    # Assert: every checkpoint is encrypted and hides the model's names
    assert after_two == ["round-000000.fpck", "round-000001.fpck", "round-000002.fpck"]
    checkpoints = sorted((config.state_dir / "checkpoints").iterdir())
    assert len(checkpoints) == 4
    for path in checkpoints:
        assert is_sealed(path) and NAME.encode() not in path.read_bytes()
    store = Store(config.state_dir, key=config.encryption_key.load())
    assert store.rounds() == [0, 1, 2, 3]
    committed = store.last_committed()
    assert committed is not None and committed.round == 3
    final = store.load_checkpoint(committed.checkpoint, sha256=committed.sha256).arrays()[NAME]
    np.testing.assert_allclose(final, 3 * 2.0)  # each round adds (1 + 3) / 2
    store.close()
    # The ledger and its marker are encrypted, and a new process reopens them with the key.
    for name in ("ledger.json", "ledger.json.marker"):
        assert is_sealed(tmp_path / "silo" / name)
    reopened = subprocess.run(
        [sys.executable, "-c", REOPEN, str(silo_toml)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    rounds, spent = reopened.stdout.split()
    assert rounds == "1,2,3"
    with silo_config.open_ledger() as ledger:
        assert float(spent) == pytest.approx(ledger.spent_epsilon(), abs=1e-6)


def test_a_restart_with_a_wrong_or_missing_key_or_a_changed_checkpoint_is_refused(
    tmp_path, pki, monkeypatch
):
    # Arrange: one encrypted round
    monkeypatch.setenv("FEDPRIV_TEST_STATE_KEY", AtRestKey.generate().to_text())
    monkeypatch.setenv("FEDPRIV_TEST_OTHER_KEY", AtRestKey.generate().to_text())
    arrays = {NAME: np.zeros(300_000, np.float32)}
    config = dataclasses.replace(
        make_config(tmp_path, pki.root, arrays, num_rounds=1, federated_evaluation=False),
        encryption_key=KeySource(env="FEDPRIV_TEST_STATE_KEY"),
    )
    with Coordinator(config) as coordinator:
        with (
            silo_thread(ArrayClient(delta=1.0), port=coordinator.port, tls=pki.tls("silo-a")),
            silo_thread(ArrayClient(delta=3.0), port=coordinator.port, tls=pki.tls("silo-b")),
        ):
            assert coordinator.wait(timeout_s=60)
    newest = config.state_dir / "checkpoints" / "round-000001.fpck"
    # Act / Assert: the wrong key, no key, and one changed byte each stop the start
    with pytest.raises(IntegrityError, match="another key"):
        Coordinator(
            dataclasses.replace(config, encryption_key=KeySource(env="FEDPRIV_TEST_OTHER_KEY"))
        )
    with pytest.raises(ConfigError, match="is encrypted, but no encryption key"):
        Coordinator(dataclasses.replace(config, encryption_key=None))
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x80
    newest.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="wrong key or the file was modified") as caught:
        Coordinator(config)
    assert str(newest) in str(caught.value)
    # A plain state folder is not silently taken over by a configured key either.
    (tmp_path / "plain").mkdir()
    plain = make_config(tmp_path / "plain", pki.root, arrays)
    Coordinator(plain).store.close()  # commits the initial model, plain
    with pytest.raises(IntegrityError, match="is not encrypted"):
        Coordinator(dataclasses.replace(plain, encryption_key=config.encryption_key))
    assert read_checkpoint(plain.state_dir / "checkpoints" / "round-000000.fpck").layout
