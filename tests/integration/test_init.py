"""`fedpriv init DIR` writes a federation that runs exactly as the command prints it."""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys
import time

from tests.integration.test_processes import ROOT, free_port

BIN = pathlib.Path(sys.executable).parent


def test_init_scaffolds_a_federation_that_runs_as_printed(tmp_path):
    # Arrange
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the scaffold must not need the repository on the path
    target = tmp_path / "myfed"
    port = free_port()
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
            f"127.0.0.1:{port}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert init.returncode == 0, init.stderr
    printed = init.stdout.split("run it, each command in its own terminal:\n")[1].splitlines()
    assert printed[0].strip() == f"cd {target}"
    commands = [line.strip() for line in printed[1:]]
    coordinator, *silos, status = commands
    assert coordinator.startswith("fedpriv coordinator") and len(silos) == 2
    assert status.startswith("fedpriv status")
    # Act: run each printed command as its own process, from the printed folder
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = []
    for k, command in enumerate([coordinator, *silos]):
        with open(logs / f"{k}.log", "w") as log:
            processes.append(
                subprocess.Popen(
                    shlex.split(command),
                    cwd=target,
                    env=env,
                    stdout=subprocess.PIPE if k == 0 else subprocess.DEVNULL,
                    stderr=log,
                    text=True,
                )
            )
    try:
        deadline = time.monotonic() + 60
        while True:
            asked = subprocess.run(
                shlex.split(status),
                cwd=target,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            if asked.returncode == 0 and "silo-1" in asked.stdout:
                break
            assert time.monotonic() < deadline, asked.stderr
            time.sleep(0.5)
        out, _ = processes[0].communicate(timeout=240)
        codes = [p.wait(60) for p in processes[1:]]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
    # Assert
    assert processes[0].returncode == 0, (logs / "0.log").read_text()
    assert codes == [0, 0]
    rounds = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(line.split()[0]) for line in rounds] == [1, 2, 3]
    accuracy = float(out.split("final accuracy:")[1].split()[0])
    assert accuracy > 0.5  # four classes: chance is 0.25
    assert "federation: myfed" in asked.stdout
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
