"""`fedpriv init DIR` writes a federation that runs exactly as the command prints it."""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys

from tests.integration.test_processes import ROOT
from tests.processes import LISTENING, processes

BIN = pathlib.Path(sys.executable).parent


def test_init_scaffolds_a_federation_that_runs_as_printed(tmp_path):
    # Arrange
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the scaffold must not need the repository on the path
    target = tmp_path / "myfed"
    init = subprocess.run(
        [
            "fedpriv",
            "init",
            str(target),
            "--silos",
            "2",
            "--rounds",
            "3",
            "--address",
            "127.0.0.1:0",  # the coordinator picks a free port and prints it
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert init.returncode == 0, init.stderr
    run_part, rest = init.stdout.split("run it, each command in its own terminal:\n")[1].split(
        "while it runs, watch it from another terminal (in the same folder):\n"
    )
    printed = run_part.splitlines()
    assert printed[0].strip() == f"cd {target}"
    coordinator, *silos = [line.strip() for line in printed[1:]]
    assert coordinator.startswith("fedpriv coordinator") and len(silos) == 2
    status = rest.splitlines()[0].strip()
    assert status.startswith("fedpriv status")
    assert f"round log in {target / 'coordinator' / 'state'};" in rest
    plots = f"epsilon per round (into {target / 'coordinator' / 'state'}/report):\n"
    report = rest.split(plots)[1].splitlines()[0].strip()
    # Act: run each printed command as its own process, from the printed folder. The
    # one edit: port 0 is known only once the coordinator has bound it, so the silos'
    # and the operator's files get the port it printed.
    logs = tmp_path / "logs"
    logs.mkdir()
    with processes(logs) as running:
        server = running.command("coordinator", shlex.split(coordinator), env=env, cwd=target)
        port = int(server.wait_for(LISTENING).group(1))
        for config in target.rglob("*.toml"):
            text = config.read_text()
            if '"127.0.0.1:0"' in text and "[coordinator]" in text:
                config.write_text(text.replace('"127.0.0.1:0"', f'"127.0.0.1:{port}"'))
        parties = [
            running.command(f"silo-{k}", shlex.split(command), env=env, cwd=target)
            for k, command in enumerate(silos, start=1)
        ]
        server.wait_for("joined silo=silo-1")
        asked = subprocess.run(
            shlex.split(status), cwd=target, env=env, capture_output=True, text=True, timeout=60
        )
        assert asked.returncode == 0 and "silo-1" in asked.stdout, asked.stderr
        code = server.wait(240)
        codes = [p.wait(60) for p in parties]
    out = "".join(server.stdout)
    # Assert
    assert code == 0, server.text()
    assert codes == [0, 0]
    rounds = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(line.split()[0]) for line in rounds] == [1, 2, 3]
    accuracy = float(out.split("final accuracy:")[1].split()[0])
    assert accuracy > 0.5  # four classes: chance is 0.25
    assert "federation: myfed" in asked.stdout
    # The printed report command plots the run, from the same folder.
    plotted = subprocess.run(
        shlex.split(report), cwd=target, env=env, capture_output=True, text=True, timeout=120
    )
    assert plotted.returncode == 0, plotted.stderr
    assert (target / "coordinator" / "state" / "report" / "accuracy.png").stat().st_size > 0
    assert not (target / "silo-1" / "pki" / "ca.key").exists()


def test_init_refuses_a_folder_that_holds_files(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = subprocess.run(
        [sys.executable, "-m", "fedpriv", "init", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "is not empty" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
