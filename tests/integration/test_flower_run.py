"""`fedpriv run PROJECT_DIR`: a Flower project, copied unedited, runs as a local federation.

The command is run as a user runs it (a subprocess, in the project's directory);
its final model is compared with Flower's own ``Strategy.start`` loop over the
same ClientApp. The ServerApp planning is tested on the legacy API and on a main
fedpriv cannot schedule.
"""

from __future__ import annotations

import pathlib
import shutil

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg

from fedpriv.coordinator import read_checkpoint
from fedpriv.errors import ConfigError
from fedpriv.run import FlowerProject
from fedpriv.run.flower_server import plan_server_app
from tests.flower_reference import flower_run
from tests.processes import fedpriv_run, project_files

PROJECT = pathlib.Path(__file__).resolve().parents[1] / "flower_project"


def _context(run_config):
    return Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


@pytest.mark.slow
def test_fedpriv_run_completes_an_unedited_flower_project(tmp_path, monkeypatch):
    project = tmp_path / "quickstart-np"
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns("__pycache__"))
    before = project_files(project)
    done, final_path = fedpriv_run(project, ".", "--quiet", "--state-dir", str(tmp_path / "s"))
    final = read_checkpoint(final_path).arrays()
    # Three rounds (the app's num-server-rounds), three silos (its num-supernodes).
    assert final_path.name == "round-000003.fpck"
    assert "silo-2" in done.stderr and "silo-3" not in done.stderr
    # The project itself is untouched (its state went to --state-dir).
    assert project_files(project) == before

    monkeypatch.syspath_prepend(str(PROJECT))
    from quickstart_np import client_app, task

    expected = flower_run(
        FedAvg(),
        client_app.app,
        PROJECT,
        partitions=3,
        initial=task.initial_weights(),
        num_rounds=3,
    )
    for got, want in zip(final.values(), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_the_project_file_names_the_apps_and_the_silo_count(tmp_path):
    project = FlowerProject.read(PROJECT)
    assert (project.serverapp, project.clientapp, project.silos) == (
        "quickstart_np.server_app:app",
        "quickstart_np.client_app:app",
        3,
    )
    (tmp_path / "pyproject.toml").write_text('[tool.flwr.app.components]\nserverapp = "a:b"\n')
    with pytest.raises(ConfigError, match="needs clientapp"):
        FlowerProject.read(tmp_path)
    with pytest.raises(ConfigError, match="no Flower project"):
        FlowerProject.read(tmp_path / "missing")


def test_after_flwr_run_moved_the_federations_the_silo_count_comes_from_flowers_config(
    tmp_path, monkeypatch
):
    # flwr run moves [tool.flwr.federations] into $FLWR_HOME/config.toml on first use.
    (tmp_path / "pyproject.toml").write_text(
        '[tool.flwr.app.components]\nserverapp = "a:b"\nclientapp = "a:c"\n'
    )
    home = tmp_path / "flwr-home"
    home.mkdir()
    monkeypatch.setenv("FLWR_HOME", str(home))
    assert FlowerProject.read(tmp_path).silos == 2  # no Flower config: the default
    config = home / "config.toml"
    config.write_text(
        '[superlink]\ndefault = "local-simulation"\n\n'
        '[superlink.local-simulation]\naddress = ":local:"\noptions.num-supernodes = 7\n\n'
        '[superlink.remote]\naddress = "10.0.0.1:9093"\noptions.num-supernodes = 5\n'
    )
    assert FlowerProject.read(tmp_path).silos == 7
    # A default connection to a real SuperLink says nothing about local silos.
    config.write_text(
        config.read_text().replace('default = "local-simulation"', 'default = "remote"')
    )
    assert FlowerProject.read(tmp_path).silos == 2


def test_a_legacy_server_app_hands_over_its_strategy_rounds_and_model(monkeypatch):
    monkeypatch.syspath_prepend(str(PROJECT))
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from quickstart_np import legacy_server_app, task

    plan = plan_server_app(legacy_server_app.app, _context({"num-server-rounds": 4}))
    assert isinstance(plan.strategy, LegacyFedAvg)
    assert plan.num_rounds == 4
    for got, want in zip(plan.initial.values(), task.initial_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_the_message_api_main_hands_over_start_arguments(monkeypatch):
    monkeypatch.syspath_prepend(str(PROJECT))
    from quickstart_np import server_app

    plan = plan_server_app(
        server_app.app, _context({"num-server-rounds": 2, "fraction-evaluate": 1.0})
    )
    assert isinstance(plan.strategy, FedAvg) and plan.num_rounds == 2
    assert plan.train_config == {"note": "from the ServerApp"}


def test_a_main_that_drives_the_grid_itself_is_refused_naming_the_call():
    app = ServerApp()

    @app.main()
    def main(grid, context):
        while len(list(grid.get_node_ids())) < 2:  # a hand-written round loop
            pass

    with pytest.raises(ConfigError, match=r"grid\.get_node_ids\(\).*strategy\.start"):
        plan_server_app(app, _context({}))

    empty = ServerApp()

    @empty.main()
    def nothing(grid, context):
        return None

    with pytest.raises(ConfigError, match="without starting a strategy"):
        plan_server_app(empty, _context({}))
