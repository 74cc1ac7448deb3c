"""fedpriv against Flower on one workload, one after the other in the same run.

Workload: N clients, P float32 parameters over 4 arrays, R rounds of FedAvg;
each client's "training" returns the received parameters plus a small
perturbation, so transport, serialisation and aggregation are what is measured.

- fedpriv: `fedpriv coordinator` and N `fedpriv client` processes on 127.0.0.1,
  plain text (like for like) and with mTLS (fedpriv's default).
- Flower (the flwr version fedpriv depends on): its Deployment Engine, that is
  `flower-superlink`, N `flower-supernode` processes and the ServerApp in its own
  process (launched by `flwr run`), plain text, on 127.0.0.1. The ServerApp and
  ClientApp are benchmarks/flower_app/flwr_bench.py.

Round time, the same for both: a round's start to the next round's start, the
last round's start to its end. fedpriv's from its store (the end is the
commit), Flower's from its strategy (configure_fit starts a round, the end of
aggregate_fit ends the last one). Coordinator-side peak
RSS: fedpriv's coordinator (the kernel's high-water mark); Flower's SuperLink
plus every process under it (SuperExec, ServerApp), summed and sampled every
50 ms. Bytes per client: fedpriv counts what each silo sent; for Flower the
update payload (P float32 values) is shown.

    python benchmarks/vs_flower.py                          # P in {1M, 10M, 50M}, N in {2, 8}
    python benchmarks/vs_flower.py --params 1000000 --clients 2
    python benchmarks/vs_flower.py --smoke                  # tiny sizes, for the test suite
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import psutil

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.round_bench import free_port, parse_sizes, run_one, start_to_start  # noqa: E402

FLOWER_APP = ROOT / "benchmarks" / "flower_app"
ROUND_TARGET = 0.2
RSS_TARGET = 0.15


@dataclass
class Result:
    round_s: float | None
    peak_rss_mb: float | None
    sent_per_client_mb: float | None
    error: str = ""


def fedpriv_run(params: int, clients: int, rounds: int, *, insecure: bool) -> Result:
    with tempfile.TemporaryDirectory(prefix="fedpriv-vs-") as tmp:
        try:
            row = run_one(params, clients, rounds, pathlib.Path(tmp), insecure=insecure)
        except Exception as err:  # reported in the table, like Flower's failures
            return Result(None, None, None, error=f"{type(err).__name__}: {err}"[:200])
    return Result(row.median_round_s, row.coordinator_peak_rss_mb, row.sent_per_client_mb)


class TreeRss:
    """Peak of the summed RSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self._root = psutil.Process(pid)
        self._interval = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                processes = [self._root, *self._root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for process in processes:
                try:
                    total += process.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _kill_tree(process: subprocess.Popen[bytes]) -> None:
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for proc in [*children]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    process.kill()
    process.wait()


def _wait_for_port(port: int, *, timeout_s: float) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def flower_run(params: int, clients: int, rounds: int, *, timeout_s: float) -> Result:
    with tempfile.TemporaryDirectory(prefix="flower-vs-") as tmp:
        work = pathlib.Path(tmp)
        port = free_port()
        (work / "config.toml").write_text(
            f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        env = {
            **os.environ,
            "FLWR_HOME": str(work),
            "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }
        timings = work / "timings.json"
        bin_dir = pathlib.Path(sys.executable).parent
        processes: list[subprocess.Popen[bytes]] = []
        try:
            with open(work / "superlink.log", "wb") as log:
                superlink = subprocess.Popen(
                    [
                        str(bin_dir / "flower-superlink"),
                        "--insecure",
                        "--disable-runtime-dependency-installation",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                    ],
                    cwd=work,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            processes.append(superlink)
            rss = TreeRss(superlink.pid)
            _wait_for_port(port, timeout_s=60)
            for k in range(clients):
                with open(work / f"supernode-{k}.log", "wb") as log:
                    processes.append(
                        subprocess.Popen(
                            [
                                str(bin_dir / "flower-supernode"),
                                "--insecure",
                                "--superlink",
                                f"127.0.0.1:{port}",
                                "--port",
                                str(free_port()),
                            ],
                            cwd=work,
                            env=env,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                        )
                    )
            time.sleep(3)
            submitted = subprocess.run(
                [
                    str(bin_dir / "flwr"),
                    "run",
                    str(FLOWER_APP),
                    "bench",
                    "--run-config",
                    f'num-rounds={rounds} params={params} clients={clients} timings="{timings}"',
                ],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            if submitted.returncode != 0:
                output = " ".join((submitted.stdout + submitted.stderr).split())
                return Result(None, None, None, error=f"flwr run: {output[-300:]}")
            deadline = time.monotonic() + timeout_s
            starts: list[float] = []
            ends: list[float] = []
            while time.monotonic() < deadline:
                if timings.exists():
                    try:
                        recorded = json.loads(timings.read_text())
                        starts, ends = recorded["starts"], recorded["ends"]
                    except (json.JSONDecodeError, KeyError):
                        starts, ends = [], []
                    if len(ends) >= rounds:
                        break
                if superlink.poll() is not None:
                    break
                time.sleep(0.5)
            peak = rss.stop()
            if len(ends) < rounds:
                tail = (work / "superlink.log").read_text(errors="replace")[-300:]
                return Result(
                    None,
                    peak / 1e6,
                    None,
                    error=f"{len(ends)} of {rounds} rounds in {timeout_s:.0f} s; {tail!r}",
                )
            # Start to start, as fedpriv's figure; the last round ends with its aggregate.
            # Round 1 includes ClientApp start-up in every SuperNode; the median is reported.
            durations = start_to_start(starts[:rounds], ends[rounds - 1])
            return Result(statistics.median(durations), peak / 1e6, params * 4 / 1e6)
        finally:
            for process in processes:
                _kill_tree(process)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either was not measured."""
    return a / b if a is not None and b else None


def print_table(rows: list[tuple[int, int, Result, Result, Result]]) -> None:
    """Two rows per size: fedpriv in plain text (like for like), then with mTLS.

    Flower runs in plain text only; the mTLS row compares fedpriv's default
    against it and adds mTLS over plain text.
    """

    def num(value: float | None, fmt: str) -> str:
        return "fail" if value is None else format(value, fmt)

    print(
        f"{'params':>10} {'N':>3} {'fedpriv':>7} {'fedpriv s':>9} {'flower s':>9} "
        f"{'time ratio':>10} {'fedpriv RSS MB':>14} {'flower RSS MB':>13} {'RSS ratio':>9} "
        f"{'fedpriv MB/client':>17} {'flower MB/client':>16} {'mTLS/plain':>10}"
    )
    for params, clients, plain, tls, flower in rows:
        for transport, result in (("plain", plain), ("mTLS", tls)):
            over_plain = "-" if result is plain else num(ratio(tls.round_s, plain.round_s), ".3f")
            print(
                f"{params:>10,} {clients:>3} {transport:>7} {num(result.round_s, '.3f'):>9} "
                f"{num(flower.round_s, '.3f'):>9} "
                f"{num(ratio(result.round_s, flower.round_s), '.3f'):>10} "
                f"{num(result.peak_rss_mb, '.0f'):>14} {num(flower.peak_rss_mb, '.0f'):>13} "
                f"{num(ratio(result.peak_rss_mb, flower.peak_rss_mb), '.3f'):>9} "
                f"{num(result.sent_per_client_mb, '.1f'):>17} "
                f"{num(flower.sent_per_client_mb, '.1f'):>16} "
                f"{over_plain:>10}"
            )
    for params, clients, plain, tls, flower in rows:
        for name, result in (("fedpriv", plain), ("fedpriv mTLS", tls), ("flower", flower)):
            if result.error:
                print(f"# P={params:,} N={clients} {name} failed: {result.error}")
        if params == 50_000_000 and clients == 8:
            for what, value, target in (
                ("round time", ratio(plain.round_s, flower.round_s), ROUND_TARGET),
                ("coordinator peak RSS", ratio(plain.peak_rss_mb, flower.peak_rss_mb), RSS_TARGET),
            ):
                if value is None:
                    continue  # a failed run: its error is printed above
                verdict = "PASS" if value <= target else f"MISS by {value / target:.2f}x"
                print(
                    f"target: {what} <= {target}x Flower's at 50M x 8 (plain text): "
                    f"{value:.3f}x -> {verdict}"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flower-timeout-s", type=float, default=1200.0)
    # Five rounds: the median then skips the first round (which allocates what later
    # rounds reuse) and one outlier, for both systems alike.
    args = parse_sizes(parser, argv, rounds=5)
    rows = []
    for params in args.params:
        for clients in args.clients:
            started = time.monotonic()
            plain = fedpriv_run(params, clients, args.rounds, insecure=True)
            tls = fedpriv_run(params, clients, args.rounds, insecure=False)
            flower = flower_run(params, clients, args.rounds, timeout_s=args.flower_timeout_s)
            rows.append((params, clients, plain, tls, flower))
            print(
                f"# P={params:,} N={clients} done in {time.monotonic() - started:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
