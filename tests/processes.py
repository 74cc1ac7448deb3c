"""Real `fedpriv` processes for tests: started, watched line by line, killed on teardown.

No sleeps and no polling: a reader thread copies each process's stderr to its log
file and wakes whoever waits for a line (``coordinator listening port=N``,
``joined federation=``, a fault point's ``fedpriv fault point=...``). The waits
have a generous upper bound so that a broken build fails instead of hanging;
they return as soon as the line is there.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
WAIT_S = 120.0  # a bound for a broken build, never a timing window: waits end on the line
LISTENING = re.compile(r"coordinator listening port=(\d+)")
FAULT = re.compile(r"fedpriv fault point=(\S+) hit=(\d+)")


def fedpriv(*args: str) -> list[str]:
    """The ``fedpriv`` command line, run with this interpreter."""
    return [sys.executable, "-m", "fedpriv", *args]


def fedpriv_run(
    project: pathlib.Path, *args: str, timeout_s: float = 240
) -> tuple[subprocess.CompletedProcess[str], pathlib.Path]:
    """``fedpriv run ARGS`` in `project`, as a user runs it; the run and its final checkpoint.

    Raises:
        AssertionError: The run failed, or did not print one ``final model:`` line.
    """
    done = subprocess.run(
        fedpriv("run", *args), cwd=project, capture_output=True, text=True, timeout=timeout_s
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("final model: ")]
    return done, project / line.removeprefix("final model: ")


def project_files(project: pathlib.Path) -> dict[pathlib.Path, bytes]:
    """Every file under `project` but Python's caches, by relative path (to see a run edit none)."""
    return {
        path.relative_to(project): path.read_bytes()
        for path in project.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


class Watched:
    """A process whose stderr is copied to `log` and can be waited on, line by line.

    Args:
        cmd: The command line.
        log: Where its stderr goes.
        env: Its whole environment (default: this process's).
        cwd: Its working directory.
        out: A file its stdout is copied to as well (it is kept in ``stdout`` too).
        group: Start it in a process group of its own, and kill the whole group (for
            programs that start helpers of their own, as Flower's SuperLink does).
    """

    def __init__(
        self,
        cmd: list[str],
        log: pathlib.Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: pathlib.Path = ROOT,
        out: pathlib.Path | None = None,
        group: bool = False,
    ) -> None:
        self.log = log
        self.out = out
        self.group = group
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._ended = False
        self.process = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=dict(os.environ if env is None else env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=group,
        )
        self.stdout: list[str] = []
        self._readers = [
            threading.Thread(target=self._copy_stderr, daemon=True),
            threading.Thread(target=self._copy_stdout, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _copy_stderr(self) -> None:
        assert self.process.stderr is not None
        with open(self.log, "w") as handle:
            for line in self.process.stderr:
                handle.write(line)
                handle.flush()
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()
        self.process.stderr.close()
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def _copy_stdout(self) -> None:
        assert self.process.stdout is not None
        with contextlib.ExitStack() as stack:
            copy = stack.enter_context(open(self.out, "w")) if self.out is not None else None
            for line in self.process.stdout:
                self.stdout.append(line)
                if copy is not None:
                    copy.write(line)
        self.process.stdout.close()

    def wait_for(
        self, pattern: str | re.Pattern[str], *, times: int = 1, timeout_s: float = WAIT_S
    ) -> re.Match[str]:
        """The `times`-th stderr line (seen so far or to come) that matches `pattern`.

        Raises:
            AssertionError: The process ended, or `timeout_s` passed, without such a line.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        seen = found = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    found += match is not None
                    if match and found == times:
                        return match
                seen = len(self.lines)
                if self._ended:
                    raise AssertionError(
                        f"{self.log.name} ended without {regex.pattern!r}:\n{self.text()[-4000:]}"
                    )
                if not self._cond.wait(timeout_s):
                    raise AssertionError(
                        f"no {regex.pattern!r} in {self.log.name} after {timeout_s:.0f} s:\n"
                        f"{self.text()[-4000:]}"
                    )

    def count(self, pattern: str) -> int:
        """How many stderr lines so far match `pattern`."""
        regex = re.compile(pattern)
        with self._cond:
            return sum(1 for line in self.lines if regex.search(line))

    def text(self) -> str:
        """Everything the process wrote to stderr so far."""
        with self._cond:
            return "".join(self.lines)

    def wait(self, timeout_s: float = WAIT_S) -> int:
        """Wait for the process to end and for its output to be read; its exit status."""
        code = self.process.wait(timeout_s)
        for reader in self._readers:
            reader.join(timeout_s)
        return code

    def kill(self) -> None:
        """SIGKILL the process (its group, with `group`) if it still runs, and reap it."""
        if self.group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        elif self.process.poll() is None:
            self.process.kill()
        self.wait()


class Processes:
    """Starts watched processes and kills every one still running on teardown."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory
        self.started: list[Watched] = []

    def start(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> Watched:
        """Run ``fedpriv ARGS``; its stderr goes to ``DIRECTORY/NAME.log``."""
        watched = Watched(
            fedpriv(*args), self.directory / f"{name}.log", env={**os.environ, **(env or {})}
        )
        self.started.append(watched)
        return watched

    def command(
        self,
        name: str,
        cmd: list[str],
        *,
        env: Mapping[str, str],
        cwd: pathlib.Path,
        group: bool = False,
    ) -> Watched:
        """Run `cmd` as it is, in `cwd`, with exactly `env` (`group`: see :class:`Watched`)."""
        watched = Watched(cmd, self.directory / f"{name}.log", env=env, cwd=cwd, group=group)
        self.started.append(watched)
        return watched

    def coordinator(
        self, name: str, config: pathlib.Path, *, env: Mapping[str, str] | None = None
    ) -> tuple[Watched, int]:
        """Start ``fedpriv coordinator`` and wait until it listens; the port it bound."""
        watched = self.start(name, "coordinator", "--config", str(config), env=env)
        return watched, int(watched.wait_for(LISTENING).group(1))

    def close(self) -> None:
        for watched in self.started:
            watched.kill()


@contextlib.contextmanager
def processes(directory: pathlib.Path) -> Iterator[Processes]:
    """Watched processes whose logs go to `directory`; all killed when the block ends."""
    started = Processes(directory)
    try:
        yield started
    finally:
        started.close()


def write_unix_federation(
    tmp: pathlib.Path,
    pki_root: pathlib.Path,
    silos: Sequence[str],
    *,
    num_rounds: int,
    coordinator_extra: str = "",
    silo_extra: Callable[[str], str] = lambda silo: "",
) -> None:
    """Write ``coordinator.toml`` and one ``<silo>.toml`` per silo for a federation on a Unix socket.

    The restarted coordinator binds the same socket, which no other process can
    take while the first is dead (a freed TCP port can be taken). A killed silo
    counts as live for 3 heartbeats (30 s), so its open task is given again to
    the restarted process instead of failing the round. `coordinator_extra` and
    `silo_extra(silo)` are TOML appended to each file (``[dp]``, ``[privacy]``, ``[app]``).
    """
    socket = tmp / "coordinator.sock"
    (tmp / "coordinator.toml").write_text(
        f"""
[federation]
allowed_silos = {json.dumps(list(silos))}
[server]
address = "unix:{socket}"
heartbeat_interval_s = 10
poll_wait_s = 2
[tls]
ca = "{pki_root / "ca.crt"}"
cert = "{pki_root / "coordinator.crt"}"
key = "{pki_root / "coordinator.key"}"
[rounds]
num_rounds = {num_rounds}
min_clients = 2
deadline_s = 120
federated_evaluation = false
[model]
factory = "tests.apps:make_model"
chunk_bytes = 1024
[store]
dir = "{tmp / "state"}"
"""
        + coordinator_extra
    )
    for silo in silos:
        (tmp / f"{silo}.toml").write_text(
            f"""
[coordinator]
address = "unix:{socket}"
# The coordinator's certificate names localhost; a Unix socket has no host.
server_name = "localhost"
[tls]
ca = "{pki_root / "ca.crt"}"
cert = "{pki_root / f"{silo}.crt"}"
key = "{pki_root / f"{silo}.key"}"
[client]
poll_wait_s = 2
reconnect_timeout_s = 120
"""
            + silo_extra(silo)
        )
