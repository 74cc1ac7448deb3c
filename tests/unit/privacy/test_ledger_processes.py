"""Two real processes on one privacy ledger: the second is refused, so the budget is spent once.

Each silo process is a real interpreter on a real file; the test steps them
through open, check and record with lines on their pipes (no sleeps).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from fedpriv.errors import PrivacyBudgetExceeded, StoreError
from fedpriv.privacy import GaussianSteps, epsilon
from fedpriv.privacy.ledger import PrivacyBudget, PrivacyLedger

ROOT = pathlib.Path(__file__).resolve().parents[3]
RUN = GaussianSteps(noise_multiplier=1.0, sample_rate=0.1, steps=50)
# Room for one run of RUN, not two.
BUDGET = PrivacyBudget(epsilon=epsilon([RUN], delta=1e-5) * 1.2)

# What a silo's runtime does with its ledger: check before training, record after
# (fedpriv.client.runtime._privacy_plan and _run_task), one step per line from the test.
SILO = """
import sys
from fedpriv.errors import PrivacyBudgetExceeded, StoreError
from fedpriv.privacy import GaussianSteps
from fedpriv.privacy.ledger import PrivacyBudget, PrivacyLedger

run = GaussianSteps(noise_multiplier=1.0, sample_rate=0.1, steps=50)
try:
    ledger = PrivacyLedger.open(sys.argv[1], budget=PrivacyBudget(epsilon=float(sys.argv[2])))
except StoreError as err:
    print("refused", str(err).replace("\\n", " "), flush=True)
    sys.exit(0)
print("opened", flush=True)
try:
    ledger.check(run)
except PrivacyBudgetExceeded:
    print("exceeded", flush=True)
    sys.exit(0)
print("checked", flush=True)
sys.stdin.readline()  # the test lets it record
try:
    ledger.record(run, round=1, max_grad_norm=1.0)
except PrivacyBudgetExceeded:
    print("exceeded", flush=True)
    sys.exit(0)
print("recorded", flush=True)
sys.stdin.readline()  # the test lets it exit
"""


class Silo:
    def __init__(self, path: pathlib.Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", SILO, str(path), repr(BUDGET.epsilon)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def says(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, self.process.stderr.read() if self.process.stderr else "no output"
        return line.strip()

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def finish(self) -> None:
        if self.process.stdin is not None:
            try:
                if self.process.poll() is None:
                    self.process.stdin.write("exit\n")
                self.process.stdin.close()
            except BrokenPipeError:  # it exited meanwhile
                pass
        assert self.process.wait(30) == 0, self.process.stderr.read() if self.process.stderr else ""
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def test_two_processes_that_both_check_before_either_records_cannot_overspend(tmp_path):
    # Arrange: silo A opens the ledger and passes the check, then waits before recording
    path = tmp_path / "ledger.json"
    a = Silo(path)
    b = None
    try:
        assert a.says() == "opened"
        assert a.says() == "checked"
        # Act: silo B, a second process on the same ledger, tries the same while A waits
        b = Silo(path)
        b_first = b.says()
        if b_first == "opened":  # without the lock B gets this far ...
            assert b.says() == "checked"  # ... and passes the same check
            b.go()
        a.go()
        outcomes = [a.says()] + ([b.says()] if b_first == "opened" else [b_first])
    finally:
        a.finish()
        if b is not None:
            b.finish()
    # Assert: B was refused at open, naming the file and A's pid; one run, recorded once
    recorded = sum(o == "recorded" for o in outcomes)
    on_disk = json.loads(path.read_text())["entries"]
    assert recorded == 1 and len(on_disk) == 1, (outcomes, on_disk)
    refusal = outcomes[1]
    assert refusal.startswith("refused") and str(path) in refusal
    assert f"pid {a.process.pid}" in refusal and "in use by another process" in refusal


def test_lock_goes_with_a_killed_holder_and_the_next_process_sees_its_spend(tmp_path):
    # Arrange: silo A records a run, then is killed -9 while it holds the ledger
    path = tmp_path / "ledger.json"
    a = Silo(path)
    try:
        assert a.says() == "opened" and a.says() == "checked"
        a.go()
        assert a.says() == "recorded"
        with pytest.raises(StoreError, match=f"pid {a.process.pid}"):
            PrivacyLedger.open(path, budget=BUDGET)
        # Act
        a.process.send_signal(signal.SIGKILL)
        assert a.process.wait(30) == -signal.SIGKILL
    finally:
        if a.process.poll() is None:
            a.process.kill()
            a.process.wait()
        for stream in (a.process.stdin, a.process.stdout, a.process.stderr):
            if stream is not None:
                stream.close()
    # Assert: no stale lock; A's spend counts, so a second run is refused
    with PrivacyLedger.open(path, budget=BUDGET) as ledger:
        assert len(ledger.entries) == 1
        with pytest.raises(PrivacyBudgetExceeded):
            ledger.check(RUN)
