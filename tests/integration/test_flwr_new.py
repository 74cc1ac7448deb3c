"""A project that `flwr new` generates runs on fedpriv unedited, by `fedpriv run .`.

`flwr new` in Flower 1.25 and later downloads its templates from the Flower Hub,
which the test machines cannot reach. flwr 1.24.0 is the last release that ships
them; `make test` downloads its wheel (never installed) and this test runs that
release's own `flwr new` from it, so the project is what Flower generates, not a
copy of it. Its NumPy template loads no data, so it runs offline.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from fedpriv.coordinator import read_checkpoint
from tests.helpers import require_privilege
from tests.processes import fedpriv_run, project_files

WHEELS = pathlib.Path(sys.prefix) / "flwr-new"
GENERATE = "import sys; from flwr.cli.app import app; sys.argv[0] = 'flwr'; app()"


def _flwr_new(tmp_path: pathlib.Path) -> pathlib.Path:
    wheels = sorted(WHEELS.glob("flwr-1.24.*-py3-none-any.whl"))
    require_privilege(
        None if wheels else f"no flwr 1.24 wheel in {WHEELS} (`make test` downloads it)"
    )
    release = tmp_path / "flwr-1.24"
    with zipfile.ZipFile(wheels[-1]) as wheel:
        wheel.extractall(release)
    workdir = tmp_path / "work"
    workdir.mkdir()
    args = ["new", "quickstart-np", "--framework", "NumPy", "--username", "fedpriv"]
    done = subprocess.run(
        [sys.executable, "-c", GENERATE, *args],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(release)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return workdir / "quickstart-np"


@pytest.mark.slow
def test_a_flwr_new_numpy_project_completes_a_federation_unedited(tmp_path):
    project = _flwr_new(tmp_path)
    pyproject = (project / "pyproject.toml").read_text()
    # What flwr new wrote: its Message-API apps and a 10-node local simulation.
    assert 'serverapp = "quickstart_np.server_app:app"' in pyproject
    assert "options.num-supernodes = 10" in pyproject
    assert "@app.train()" in (project / "quickstart_np" / "client_app.py").read_text()
    before = project_files(project)

    done, final_path = fedpriv_run(project, ".", "--state-dir", str(tmp_path / "s"))
    # The template's num-server-rounds (3), with its 10 supernodes as 10 silos.
    assert final_path.name == "round-000003.fpck"
    pushed = {
        line.split("silo=")[1].split()[0]
        for line in done.stderr.splitlines()
        if "[Fleet.PushResult]" in line and "round=3 kind=TRAIN" in line
    }
    assert pushed == {f"silo-{i}" for i in range(10)}
    [final] = read_checkpoint(final_path).arrays().values()
    # The template's model is ones((1, 1)); each round every node adds U(0, 1) noise and
    # FedAvg averages 10 of them, so three rounds land near 1 + 3 * 0.5.
    assert final.shape == (1, 1) and final.dtype == np.float64
    assert 1.5 < float(final[0, 0]) < 3.5
    assert project_files(project) == before
