"""Fault-injection points: parsing, hit counting, and each action in a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from fedpriv.errors import ConfigError
from fedpriv.faults import (
    FAULT_EXIT_CODE,
    FaultAction,
    FaultPoint,
    FaultSpec,
    arm,
    arm_from_environment,
    disarm,
    reach,
)
from tests.processes import ROOT


def test_a_spec_names_point_hit_and_action():
    spec = FaultSpec.parse("after-checkpoint-before-sql@3,exit")
    assert spec == FaultSpec(
        point=FaultPoint.AFTER_CHECKPOINT_BEFORE_SQL, hit=3, action=FaultAction.EXIT
    )
    assert FaultSpec.parse("during-upload") == FaultSpec(point=FaultPoint.DURING_UPLOAD)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("after-fold", "unknown point 'after-fold'"),
        ("during-upload@0", "must be >= 1"),
        ("during-upload@x", "must be a positive integer"),
        ("during-upload,explode", "unknown action 'explode'"),
        ("during-upload,hold", "FEDPRIV_FAULT_FIFO"),
    ],
)
def test_a_malformed_spec_is_refused_with_the_reason(text, words):
    with pytest.raises(ConfigError, match=words):
        FaultSpec.parse(text)


def test_nothing_is_armed_without_the_variable():
    assert arm_from_environment({}) is None
    reach(FaultPoint.DURING_UPLOAD)  # returns: nothing armed


def test_only_the_armed_point_on_its_hit_acts(tmp_path, capsys):
    fifo = tmp_path / "release.fifo"
    os.mkfifo(fifo)
    arm(FaultSpec(point=FaultPoint.DURING_UPLOAD, hit=3, action=FaultAction.HOLD, fifo=fifo))
    try:
        reach(FaultPoint.AFTER_FOLD_BEFORE_COMMIT)  # another point: no hit
        reach(FaultPoint.DURING_UPLOAD)
        reach(FaultPoint.DURING_UPLOAD)  # hits 1 and 2 pass
        assert "fedpriv fault" not in capsys.readouterr().err
        third = threading.Thread(target=reach, args=(FaultPoint.DURING_UPLOAD,))
        third.start()
        # Opening the FIFO for writing returns only once hit 3 holds on it for reading.
        with open(fifo, "wb") as release:
            assert third.is_alive()
            release.write(b"go")
        third.join(timeout=30)
        assert not third.is_alive()
        assert "fedpriv fault point=during-upload hit=3 action=hold" in capsys.readouterr().err
    finally:
        disarm()
    reach(FaultPoint.DURING_UPLOAD)  # disarmed: returns at once
    assert "fedpriv fault" not in capsys.readouterr().err


def _run_point(env: dict[str, str], *, stdin: str = "") -> subprocess.Popen[str]:
    code = (
        "import sys; from fedpriv.faults import FaultPoint, arm_from_environment, reach; "
        "arm_from_environment(); reach(FaultPoint.DURING_UPLOAD); "
        "print('passed 1', flush=True); reach(FaultPoint.DURING_UPLOAD); print('passed 2')"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(("action", "status"), [("kill", -9), ("exit", FAULT_EXIT_CODE)])
def test_kill_and_exit_end_the_process_at_the_hit_after_saying_where(action, status):
    process = _run_point({"FEDPRIV_FAULT": f"during-upload@2,{action}"})
    out, err = process.communicate(timeout=60)
    assert process.returncode == status
    assert out == "passed 1\n"
    assert f"fedpriv fault point=during-upload hit=2 action={action} pid={process.pid}" in err


def test_hold_blocks_until_the_test_opens_the_fifo(tmp_path):
    fifo = tmp_path / "release.fifo"
    os.mkfifo(fifo)
    process = _run_point({"FEDPRIV_FAULT": "during-upload@1,hold", "FEDPRIV_FAULT_FIFO": str(fifo)})
    assert process.stderr is not None and process.stdout is not None
    # The held process says so, then waits: nothing is printed until it is released.
    assert process.stderr.readline().startswith("fedpriv fault point=during-upload hit=1")
    with open(fifo, "wb"):
        pass
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0 and out == "passed 1\npassed 2\n"


def test_the_fedpriv_command_refuses_a_malformed_variable(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fedpriv", "init", str(tmp_path / "fed")],
        cwd=ROOT,
        env={**os.environ, "FEDPRIV_FAULT": "nowhere"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "unknown point 'nowhere'" in result.stderr
    assert not (tmp_path / "fed").exists()  # refused before the command ran
