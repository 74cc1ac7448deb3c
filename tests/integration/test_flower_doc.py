"""docs/flower.md runs as written: its files are the tested app, its commands and configs work."""

from __future__ import annotations

import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

from fedpriv.cli.main import _parser
from fedpriv.client.config import ClientConfig
from fedpriv.coordinator import CoordinatorConfig, load_initial_model
from fedpriv.strategy.flower import flower_strategy
from fedpriv.strategy.flower_message import FlowerMessageStrategy

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
        done = subprocess.run(
            _fedpriv(line), cwd=tmp_path, capture_output=True, text=True, timeout=240
        )
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
        assert "final model: " in done.stdout
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
