"""Run an example federation on this machine: a CA, a coordinator and silos, each a process.

Every process is a real ``fedpriv`` command talking gRPC over 127.0.0.1 with
certificates from a fresh CA. The coordinator's output (its round table and
final lines) goes to this process's stdout; each process's log goes to
``WORK/logs/NAME.log``.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]

__all__ = [
    "ROOT",
    "coordinator_toml",
    "fedpriv",
    "free_port",
    "make_pki",
    "run_federation",
    "silo_toml",
]


def fedpriv(*args: str) -> list[str]:
    """The ``fedpriv`` command line with this interpreter."""
    return [sys.executable, "-m", "fedpriv", "--log-level", "INFO", *args]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    port: int,
    rounds: str,
    model: str,
    top: str = "",
    rest: str = "",
) -> str:
    """A coordinator's TOML on 127.0.0.1:`port` with the certificates of :func:`make_pki`.

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


def silo_toml(*, name: str, port: int, app: str, rest: str = "") -> str:
    """Silo `name`'s TOML: the coordinator on 127.0.0.1:`port`, its certificate, `[app]`."""
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
) -> int:
    """Start the coordinator and every silo (name -> (app, config)); wait for all to exit.

    Returns:
        0 when every process exited with status 0, else 1 (the logs say why).
    """
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "coordinator.log", "w") as handle:
        coordinator = subprocess.Popen(
            fedpriv("coordinator", "--config", str(coordinator_config)), cwd=ROOT, stderr=handle
        )
    # One intra-op thread per silo: the silos share this machine's cores, and
    # torch's default (one thread per core each) makes them spin against each other.
    silo_env = {**os.environ, "OMP_NUM_THREADS": "1"}
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
    failed = {name: code for name, code in codes.items() if code != 0}
    if failed or len(codes) != len(silos) + 1:
        print(f"processes failed: {failed}; see {logs}", file=sys.stderr)
        return 1
    print("all processes exited cleanly", flush=True)
    return 0
