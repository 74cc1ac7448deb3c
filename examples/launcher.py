"""Run an example federation on this machine: a CA, a coordinator and silos, each a process.

Every process is a real ``fedpriv`` command talking gRPC over 127.0.0.1 with
certificates from a fresh CA. The coordinator's output (its round table and
final lines) goes to this process's stdout; each process's log goes to
``WORK/logs/NAME.log``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO

ROOT = pathlib.Path(__file__).resolve().parents[1]

__all__ = [
    "ROOT",
    "add_work_arguments",
    "coordinator_toml",
    "fedpriv",
    "make_pki",
    "run_federation",
    "run_in_work_folder",
    "silo_toml",
]

# Marks a folder as an example's own, so a rerun may replace it and nothing else.
_MARKER = ".fedpriv-example"


def fedpriv(*args: str) -> list[str]:
    """The ``fedpriv`` command line with this interpreter."""
    return [sys.executable, "-m", "fedpriv", "--log-level", "INFO", *args]


_LISTENING = re.compile(r"coordinator listening port=(\d+)")


class _CoordinatorLog:
    """Copies the coordinator's stderr to its log and notes the port it says it bound."""

    def __init__(self, stream: IO[str], path: pathlib.Path) -> None:
        self.port: int | None = None
        self.ended_or_bound = threading.Event()
        self._thread = threading.Thread(target=self._copy, args=(stream, path), daemon=True)
        self._thread.start()

    def _copy(self, stream: IO[str], path: pathlib.Path) -> None:
        with open(path, "w") as handle:
            for line in stream:
                handle.write(line)
                handle.flush()
                match = _LISTENING.search(line) if self.port is None else None
                if match:
                    self.port = int(match.group(1))
                    self.ended_or_bound.set()
        stream.close()
        self.ended_or_bound.set()

    def join(self) -> None:
        self._thread.join()


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")


def make_pki(pki: pathlib.Path, *, federation: str, silos: Sequence[str]) -> None:
    """A CA, the coordinator's certificate (127.0.0.1, localhost) and one per silo."""
    _run(fedpriv("pki", "init", "--dir", str(pki), "--federation", federation))
    _run(
        fedpriv(
            "pki",
            "issue",
            "coordinator",
            "--server",
            "--host",
            "127.0.0.1",
            "--host",
            "localhost",
            "--dir",
            str(pki),
        )  # fmt: skip
    )
    for name in silos:
        _run(fedpriv("pki", "issue", name, "--client", "--dir", str(pki)))


def coordinator_toml(
    *,
    federation: str,
    silos: Sequence[str],
    port: int = 0,
    rounds: str,
    model: str,
    top: str = "",
    rest: str = "",
) -> str:
    """A coordinator's TOML on 127.0.0.1:`port` with the certificates of :func:`make_pki`.

    Port 0 (the default) lets the coordinator pick a free port; it prints the one
    it bound, and :func:`run_federation` gives it to the silos.

    `rounds` and `model` are the bodies of those tables; `top` goes before the
    first table (top-level keys) and `rest` after the last.
    """
    allowed = ", ".join(f'"{name}"' for name in silos)
    return f"""{top}[federation]
name = "{federation}"
allowed_silos = [{allowed}]

[server]
address = "127.0.0.1:{port}"
heartbeat_interval_s = 5
poll_wait_s = 10

[tls]
ca = "pki/ca.crt"
cert = "pki/coordinator.crt"
key = "pki/coordinator.key"

[rounds]
{rounds.strip()}

[model]
{model.strip()}

[store]
dir = "state"
{rest}"""


def silo_toml(*, name: str, port: int = 0, app: str, rest: str = "") -> str:
    """Silo `name`'s TOML: the coordinator on 127.0.0.1:`port`, its certificate, `[app]`.

    Port 0 stands for the port the coordinator binds: :func:`run_federation`
    writes that in before it starts the silo.
    """
    tail = f"\n{rest.strip()}\n" if rest.strip() else ""
    return f"""[coordinator]
address = "127.0.0.1:{port}"

[tls]
ca = "pki/ca.crt"
cert = "pki/{name}.crt"
key = "pki/{name}.key"

[client]
poll_wait_s = 10
reconnect_timeout_s = 120

[app]
{app.strip()}
{tail}"""


def run_federation(
    work: pathlib.Path,
    *,
    coordinator_config: pathlib.Path,
    silos: Mapping[str, tuple[str, pathlib.Path]],
    timeout_s: float = 900.0,
    app_path: Sequence[pathlib.Path] = (),
) -> int:
    """Start the coordinator and every silo (name -> (app, config)); wait for all to exit.

    The silos start once the coordinator listens. A silo config that names the
    coordinator as ``127.0.0.1:0`` gets the port the coordinator bound. Folders in
    `app_path` go on the silos' PYTHONPATH (for an app outside a package).

    Returns:
        0 when every process exited with status 0, else 1 (the logs say why).
    """
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    coordinator = subprocess.Popen(
        fedpriv("coordinator", "--config", str(coordinator_config)),
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert coordinator.stderr is not None  # stderr=PIPE
    log = _CoordinatorLog(coordinator.stderr, logs / "coordinator.log")
    if not log.ended_or_bound.wait(timeout_s) or log.port is None:
        coordinator.kill()
        coordinator.wait()
        print(f"the coordinator did not start; see {logs / 'coordinator.log'}", file=sys.stderr)
        return 1
    for _, config in silos.values():
        text = config.read_text()
        if '"127.0.0.1:0"' in text:
            config.write_text(text.replace('"127.0.0.1:0"', f'"127.0.0.1:{log.port}"'))
    # One intra-op thread per silo: the silos share this machine's cores, and
    # torch's default (one thread per core each) makes them spin against each other.
    silo_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if app_path:
        paths = [str(p) for p in app_path] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        silo_env["PYTHONPATH"] = os.pathsep.join(paths)
    processes: dict[str, subprocess.Popen[bytes]] = {}
    for name, (app, config) in silos.items():
        with open(logs / f"{name}.log", "w") as handle:
            processes[name] = subprocess.Popen(
                fedpriv("client", "--app", app, "--config", str(config)),
                cwd=ROOT,
                env=silo_env,
                stdout=subprocess.DEVNULL,
                stderr=handle,
            )
    codes: dict[str, int] = {}
    try:
        deadline = time.monotonic() + timeout_s
        while coordinator.poll() is None:
            crashed = [n for n, p in processes.items() if p.poll() not in (None, 0)]
            if crashed or time.monotonic() > deadline:
                print(f"silos failed: {crashed or 'timeout'}; see {logs}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        codes["coordinator"] = coordinator.returncode
        for name, process in processes.items():
            codes[name] = process.wait(timeout=60)
    finally:
        for process in [coordinator, *processes.values()]:
            if process.poll() is None:
                process.kill()
                process.wait()
        log.join()
    failed = {name: code for name, code in codes.items() if code != 0}
    if failed or len(codes) != len(silos) + 1:
        print(f"processes failed: {failed}; see {logs}", file=sys.stderr)
        return 1
    print("all processes exited cleanly", flush=True)
    return 0


def add_work_arguments(parser: argparse.ArgumentParser) -> None:
    """The --workdir and --keep options every example takes."""
    parser.add_argument(
        "--workdir",
        help="keep certificates, state, ledgers and logs here (a new or empty folder, or one "
        "an earlier run of an example made, which is replaced)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary folder after a successful run (a failed run keeps it)",
    )


def run_in_work_folder(
    workdir: str | None, *, prefix: str, keep: bool, body: Callable[[pathlib.Path], int]
) -> int:
    """Run `body` in the example's folder; return its exit code.

    Without `workdir` the folder is a new temporary one, removed after a successful run
    unless `keep`; a failed run keeps it for its logs. A `workdir` is always kept. It
    must be new, empty, or made by an earlier run (which is replaced): anything else is
    refused rather than deleted.
    """
    if workdir is None:
        work = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
    else:
        work = pathlib.Path(workdir).expanduser()
        if work.exists() and any(work.iterdir()):
            if not (work / _MARKER).exists():
                print(
                    f"--workdir {work} is not empty and no example made it; choose a new or "
                    "empty folder (nothing was changed)",
                    file=sys.stderr,
                )
                return 2
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
    (work / _MARKER).write_text("made by a fedpriv example; a rerun replaces this folder\n")
    code = 1
    try:
        code = body(work)
    finally:
        if workdir is not None or keep:
            print(f"kept {work}", flush=True)
        elif code != 0:
            print(f"kept {work} for its logs (the run failed)", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
            print(
                f"removed {work} (--keep or --workdir DIR keeps the state, logs and plots)",
                flush=True,
            )
    return code
