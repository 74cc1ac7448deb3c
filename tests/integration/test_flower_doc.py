"""docs/flower.md runs as written: its files are the tested app, its commands and configs work.

Its Flower side runs too: the SuperLink, SuperNodes and ``flwr run`` of Flower's
Deployment Runtime, as the page gives them. Flower's processes take no port 0, so
the test gives them ports that were free a moment before; it waits on what the
SuperLink prints (its SuperExec started, each SuperNode activated), never on time.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import socket
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from fedpriv.cli.main import _parser
from fedpriv.client.config import ClientConfig
from fedpriv.coordinator import CoordinatorConfig, load_initial_model, read_checkpoint
from fedpriv.strategy.flower import flower_strategy
from fedpriv.strategy.flower_message import FlowerMessageStrategy
from tests.processes import fedpriv_run, processes

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "flower.md").read_text()
PROJECT = ROOT / "tests" / "flower_project"
FILES = dict(re.findall(r"<!-- file: (\S+) -->\n```\w+\n(.*?)```\n", DOC, flags=re.S))
COMMANDS = [
    line
    for block in re.findall(r"<!-- checked: cli -->\n```bash\n(.*?)```\n", DOC, flags=re.S)
    for line in block.splitlines()
    if line.strip()
]

FLOWER_RUN = [
    line
    for block in re.findall(r"<!-- checked: flower-run -->\n```bash\n(.*?)```\n", DOC, flags=re.S)
    for line in block.splitlines()
    if line.strip()
]
[FLOWER_CONFIG] = re.findall(
    r"<!-- checked: flower-config -->\n```toml\n(.*?)```\n", DOC, flags=re.S
)


def _fedpriv(line: str) -> list[str]:
    words = shlex.split(line)
    assert words[0] == "fedpriv", line
    return [sys.executable, "-m", "fedpriv", *words[1:]]


def _write(directory: pathlib.Path) -> None:
    for name, text in FILES.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_docs_files_are_the_tested_app():
    in_doc = {name for name in FILES if not name.endswith(".toml") or name == "pyproject.toml"}
    in_project = {
        str(p.relative_to(PROJECT))
        for p in PROJECT.rglob("*")
        if p.is_file() and p.suffix in (".py", ".toml")
    }
    assert in_doc == in_project
    for name in in_doc:
        assert FILES[name] == (PROJECT / name).read_text(), f"docs/flower.md's {name} drifted"


def test_every_fedpriv_command_on_the_page_parses():
    assert len(COMMANDS) >= 8
    for line in COMMANDS:
        _parser().parse_args(shlex.split(line)[1:])


@pytest.mark.slow
def test_the_fedpriv_run_commands_complete(tmp_path):
    _write(tmp_path)
    runs = [line for line in COMMANDS if line.startswith("fedpriv run ")]
    assert len(runs) == 2
    for line in runs:
        fedpriv_run(tmp_path, *shlex.split(line)[2:])
    # The second run overrides num-server-rounds to 5.
    checkpoints = sorted(p.name for p in tmp_path.glob(".fedpriv/runs/*/coordinator/checkpoints/*"))
    assert "round-000005.fpck" in checkpoints


def test_the_multi_datacenter_configs_load_with_the_pki_the_page_issues(tmp_path, monkeypatch):
    _write(tmp_path)
    for line in COMMANDS:
        if line.startswith("fedpriv pki "):
            done = subprocess.run(
                _fedpriv(line), cwd=tmp_path, capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, f"{line}\n{done.stderr}"
    with open(tmp_path / "coordinator.toml", "rb") as file:
        coordinator = CoordinatorConfig.from_dict(tomllib.load(file), base_dir=tmp_path)
    with open(tmp_path / "silo-a.toml", "rb") as file:
        silo = ClientConfig.from_dict(tomllib.load(file), base_dir=tmp_path)
    assert silo.cert == tmp_path / "pki" / "hospital-a.crt" and silo.cert.is_file()
    assert silo.app == {"partition-id": 0, "num-partitions": 3}
    # The coordinator's model factory and strategy build, in the project's directory.
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_initial_model(coordinator.model)
    assert [spec.name for spec in model.layout.specs] == ["0", "1"]
    assert coordinator.strategy.flower is not None
    strategy = flower_strategy(
        coordinator.strategy.flower, model=model, options=coordinator.strategy.options
    )
    assert isinstance(strategy, FlowerMessageStrategy)
    assert coordinator.allowed_silos == frozenset({"hospital-a", "hospital-b", "hospital-c"})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _on_free_ports(text: str, ports: dict[str, str]) -> str:
    return re.sub(
        r"(?<=[ :])(\d{4,5})\b", lambda m: ports.setdefault(m[1], str(_free_port())), text
    )


@pytest.mark.slow
def test_flwr_run_and_fedpriv_run_give_the_same_model(tmp_path):
    project = tmp_path / "app"
    _write(project)
    ports: dict[str, str] = {}
    lines = [_on_free_ports(line, ports) for line in FLOWER_RUN]
    config = _on_free_ports(FLOWER_CONFIG, ports)
    home = tmp_path / "flwr-home"  # Flower's config home, with the page's connection
    home.mkdir()
    (home / "config.toml").write_text(config)
    bin_dir = pathlib.Path(sys.executable).parent  # flower-superexec must be on PATH
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    superlink_dir = tmp_path / "superlink"  # the ServerApp saves final_model.npz here
    superlink_dir.mkdir()
    [superlink] = [line for line in lines if line.startswith("flower-superlink ")]
    supernodes = [line for line in lines if line.startswith("flower-supernode ")]
    [flwr_run] = [line for line in lines if line.startswith("flwr run ")]
    assert len(supernodes) == 3

    with processes(tmp_path) as started:

        def start(name: str, line: str):
            return started.command(name, shlex.split(line), env=env, cwd=superlink_dir, group=True)

        link = start("superlink", superlink)
        link.wait_for("Starting Flower SuperExec")
        for i, line in enumerate(supernodes):
            start(f"supernode-{i}", line)
        link.wait_for(re.escape("[Fleet.ActivateNode] Activated node_id="), times=len(supernodes))
        done = subprocess.run(
            shlex.split(flwr_run), cwd=project, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "Strategy execution finished" in done.stdout + done.stderr
    with np.load(superlink_dir / "final_model.npz") as saved:
        flower = [saved[f"arr_{i}"] for i in range(len(saved.files))]

    [run_line] = [line for line in COMMANDS if line.startswith("fedpriv run . --silos 3")]
    _, final = fedpriv_run(project, *shlex.split(run_line)[2:])
    ours = read_checkpoint(final).arrays()
    assert len(flower) == len(ours) == 2
    for got, want in zip(ours.values(), flower, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    # A model that moved: three rounds of training, not the zeros it started from.
    assert np.abs(flower[0]).max() > 0.1
