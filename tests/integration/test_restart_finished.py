"""A coordinator restarted on a federation that already finished says so and exits."""

from __future__ import annotations

import logging
import pathlib
import subprocess
import sys
import tomllib

import pytest

from fedpriv.coordinator import Coordinator, CoordinatorConfig, Store
from fedpriv.errors import ConfigError
from tests.apps import DeltaClient
from tests.helpers import silo_thread

ROOT = pathlib.Path(__file__).resolve().parents[2]


def write_config(tmp_path: pathlib.Path, *, factory: str = "tests.apps:make_model") -> pathlib.Path:
    tls = "\n".join(
        f'{k} = "{tmp_path / "pki" / v}"'
        for k, v in (("ca", "ca.crt"), ("cert", "coordinator.crt"), ("key", "coordinator.key"))
    )
    path = tmp_path / "coordinator.toml"
    path.write_text(f"""
[federation]
name = "restart"
[server]
address = "127.0.0.1:0"
[tls]
{tls}
[rounds]
num_rounds = 1
min_clients = 2
federated_evaluation = false
[model]
factory = "{factory}"
[store]
dir = "{tmp_path / "state"}"
""")
    return path


def load(path: pathlib.Path) -> CoordinatorConfig:
    return CoordinatorConfig.from_dict(tomllib.loads(path.read_text()), base_dir=path.parent)


def finished_federation(tmp_path: pathlib.Path, pki) -> CoordinatorConfig:
    """Run the one round of `write_config`'s federation to the end."""
    (tmp_path / "pki").symlink_to(pki.root)
    config = load(write_config(tmp_path))
    with Coordinator(config) as coordinator:
        with (
            silo_thread(DeltaClient(1.0), port=coordinator.port, tls=pki.tls("silo-a")),
            silo_thread(DeltaClient(3.0), port=coordinator.port, tls=pki.tls("silo-b")),
        ):
            assert coordinator.wait(timeout_s=60)
    return config


def test_a_restart_after_the_last_round_says_the_federation_finished(tmp_path, pki, caplog):
    # Arrange
    config = finished_federation(tmp_path, pki)
    # Act: the CLI, as an operator restarts it
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedpriv",
            "coordinator",
            "--config",
            str(tmp_path / "coordinator.toml"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Assert: exit 0, saying so and how to go on; no round ran
    assert result.returncode == 0, result.stdout + result.stderr
    assert "had already finished all 1 rounds; nothing to do" in result.stdout, result.stdout
    assert "already finished: all 1 rounds are committed" in result.stderr, result.stderr
    assert "raise rounds.num_rounds" in result.stderr
    store = Store(config.state_dir)
    assert store.rounds() == [0, 1]
    store.close()


def test_a_restart_with_a_broken_model_factory_is_refused_even_when_finished(tmp_path, pki):
    # Arrange
    config = finished_federation(tmp_path, pki)
    broken = load(write_config(tmp_path, factory="tests.apps:make_modle"))
    # Act / Assert: the factory is not called on a resume, but it is checked
    with pytest.raises(
        ConfigError, match="model.factory = 'tests.apps:make_modle'.*no 'make_modle'"
    ):
        Coordinator(broken)
    not_callable = load(write_config(tmp_path, factory="tests.apps:np"))
    with pytest.raises(ConfigError, match="not a function that returns the initial model"):
        Coordinator(not_callable)
    assert Store(config.state_dir).rounds() == [0, 1]


def test_a_resumed_unfinished_federation_is_not_called_finished(tmp_path, pki, caplog):
    # Arrange: one round done, then two more asked for
    finished_federation(tmp_path, pki)
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("num_rounds = 1", "num_rounds = 3"))
    # Act
    with caplog.at_level(logging.INFO, logger="fedpriv.coordinator.daemon"):
        coordinator = Coordinator(load(path))
    coordinator.store.close()
    # Assert
    assert not coordinator.already_finished
    assert "resuming after committed round=1" in caplog.text
