"""Round time, bytes per client and coordinator peak RSS, with real processes over mTLS.

Starts `fedpriv coordinator` and N `fedpriv client` processes on 127.0.0.1 with
certificates from a fresh CA, runs R rounds of a native strategy (FedAvg unless
--strategy names another) on a model of P float32 parameters, and prints one row
per (P, N). The coordinator's peak RSS is the kernel's high-water mark for that
process (wait4 ru_maxrss), not a sample.

    python benchmarks/round_bench.py                 # P in {1M, 10M, 50M}, N in {2, 8}
    python benchmarks/round_bench.py --params 10000000 --clients 8 --strategy median
    python benchmarks/round_bench.py --insecure      # plain-text gRPC instead of mTLS
    python benchmarks/round_bench.py --smoke         # tiny sizes, for the test suite
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import pathlib
import re
import resource
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_app import model_arrays  # noqa: E402
from fedpriv.coordinator import write_checkpoint  # noqa: E402
from fedpriv.pki import CertificateAuthority, Role  # noqa: E402
from fedpriv.strategy.registry import StrategyName  # noqa: E402
from fedpriv.wire import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, Model  # noqa: E402

RSS_LIMIT_FACTOR = 4.0
ONE_MODEL_FACTOR = 1.3
# --silo-app: what the benchmark silos run.
SILO_APPS = {
    "numpy": "benchmarks.bench_app:make_client",  # in-place perturbation of the arrays
    "torch": "benchmarks.bench_app:make_torch_client",  # a TorchClient, one SGD step
    "torch-copy": "benchmarks.bench_app:make_torch_client",  # the same, model copied in
}
#: The robust rules read the spools slice by slice: N slices plus one output model.
ROBUST_RSS_LIMIT_FACTOR = 2.0
ROBUST = frozenset({StrategyName.KRUM, StrategyName.MEDIAN, StrategyName.TRIMMED_MEAN})


@dataclass
class Row:
    params: int
    clients: int
    rounds: int
    median_round_s: float
    sent_per_client_mb: float
    coordinator_peak_rss_mb: float
    strategy: StrategyName = StrategyName.FEDAVG
    # CPU seconds (user + system) over the whole run, per round.
    coordinator_cpu_s: float = 0.0
    clients_cpu_s: float = 0.0
    # The largest of the silo processes' peak RSS (wait4 ru_maxrss).
    silo_peak_rss_mb: float = 0.0

    @property
    def model_mb(self) -> float:
        return self.params * 4 / 1e6

    @property
    def rss_ratio(self) -> float:
        return self.coordinator_peak_rss_mb / self.model_mb

    @property
    def silo_rss_ratio(self) -> float:
        return self.silo_peak_rss_mb / self.model_mb


def strategy_table(strategy: StrategyName) -> str:
    """The coordinator's ``[strategy]`` table; Krum assumes one Byzantine silo."""
    if strategy is StrategyName.FEDAVG:
        return ""
    options = "\noptions = { byzantine = 1 }" if strategy is StrategyName.KRUM else ""
    return f'[strategy]\nname = "{strategy.value}"{options}\n'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_pki(work: pathlib.Path, clients: int) -> None:
    ca = CertificateAuthority.create(work / "pki", federation="bench")
    ca.issue("coordinator", role=Role.SERVER, out_dir=work / "pki", hosts=["127.0.0.1"])
    for k in range(clients):
        ca.issue(f"silo-{k}", role=Role.CLIENT, out_dir=work / "pki")


def cpu_s(usage: resource.struct_rusage) -> float:
    """User plus system CPU seconds in `usage`."""
    return usage.ru_utime + usage.ru_stime


def start_to_start(starts: Sequence[float], last_end: float) -> list[float]:
    """Each round's time from its start to the next round's; the last round's to `last_end`."""
    return [later - start for start, later in itertools.pairwise(starts)] + [last_end - starts[-1]]


def run_one(
    params: int,
    clients: int,
    rounds: int,
    work: pathlib.Path,
    *,
    extra_config: str = "",
    insecure: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    strategy: StrategyName = StrategyName.FEDAVG,
    silo_app: str = "numpy",
) -> Row:
    """One federation; `extra_config` is put at the top of the coordinator's TOML.

    With `insecure`, every process runs with --insecure (plain-text gRPC), for
    like-for-like comparisons with systems that run without TLS.
    """
    make_pki(work, clients)
    port = free_port()
    write_checkpoint(
        work / "initial.fpck", Model.from_arrays(model_arrays(params), chunk_bytes=chunk_bytes)
    )
    (work / "coordinator.toml").write_text(f"""{extra_config}
[server]
address = "127.0.0.1:{port}"
poll_wait_s = 5
[tls]
ca = "pki/ca.crt"
cert = "pki/coordinator.crt"
key = "pki/coordinator.key"
[rounds]
num_rounds = {rounds}
min_clients = {clients}
deadline_s = 900
federated_evaluation = false
[model]
checkpoint = "initial.fpck"
[store]
dir = "state"
{strategy_table(strategy)}""")
    for k in range(clients):
        (work / f"silo-{k}.toml").write_text(f"""
[coordinator]
address = "127.0.0.1:{port}"
[tls]
ca = "pki/ca.crt"
cert = "pki/silo-{k}.crt"
key = "pki/silo-{k}.key"
[client]
poll_wait_s = 5
[app]
seed = {k}
params = {params}
copy_in = {str(silo_app == "torch-copy").lower()}
""")
    command = [sys.executable, "-m", "fedpriv", "--log-level", "INFO"]
    with open(work / "coordinator.log", "w") as log:
        coordinator = subprocess.Popen(
            [
                *command,
                "coordinator",
                "--quiet",
                "--config",
                str(work / "coordinator.toml"),
                *(["--insecure"] if insecure else []),
            ],
            cwd=ROOT,
            stderr=log,
            stdout=subprocess.DEVNULL,
        )
    silos = []
    for k in range(clients):
        with open(work / f"silo-{k}.log", "w") as log:
            silos.append(
                subprocess.Popen(
                    [
                        *command,
                        "client",
                        "--app",
                        SILO_APPS[silo_app],
                        "--config",
                        str(work / f"silo-{k}.toml"),
                        *(["--insecure", "--identity", f"silo-{k}"] if insecure else []),
                    ],
                    cwd=ROOT,
                    stderr=log,
                    stdout=subprocess.DEVNULL,
                )
            )
    _, status, usage = os.wait4(coordinator.pid, 0)
    coordinator.returncode = os.waitstatus_to_exitcode(status)
    if coordinator.returncode != 0:
        # Its silos would retry until their reconnect timeout; the run has failed already.
        for silo in silos:
            silo.terminate()
    codes = []
    clients_cpu = 0.0
    silo_peak_kib = 0
    for silo in silos:
        _, silo_status, silo_usage = os.wait4(silo.pid, 0)
        silo.returncode = os.waitstatus_to_exitcode(silo_status)
        codes.append(silo.returncode)
        clients_cpu += cpu_s(silo_usage)
        silo_peak_kib = max(silo_peak_kib, silo_usage.ru_maxrss)
    if coordinator.returncode != 0 or any(codes):
        raise RuntimeError(
            f"benchmark processes failed ({coordinator.returncode}, {codes}); see {work}"
        )
    with contextlib.closing(sqlite3.connect(work / "state" / "state.sqlite3")) as db:
        rows = db.execute(
            "SELECT started_unix_s, finished_unix_s FROM rounds WHERE round > 0 ORDER BY round"
        ).fetchall()
    # A round lasts until the next one starts: its checkpoint becomes durable while the
    # next round's silos download, so start-to-start is what R rounds cost, divided by R.
    # The last round lasts until its commit.
    durations = start_to_start([start for start, _ in rows], rows[-1][1])
    sent = [
        int(re.search(r"bytes_sent=(\d+)", (work / f"silo-{k}.log").read_text()).group(1))  # type: ignore[union-attr]
        for k in range(clients)
    ]
    return Row(
        params=params,
        clients=clients,
        rounds=rounds,
        median_round_s=statistics.median(durations),
        sent_per_client_mb=statistics.mean(sent) / rounds / 1e6,
        # Linux reports ru_maxrss in KiB.
        coordinator_peak_rss_mb=usage.ru_maxrss * 1024 / 1e6,
        coordinator_cpu_s=cpu_s(usage) / rounds,
        clients_cpu_s=clients_cpu / rounds,
        strategy=strategy,
        silo_peak_rss_mb=silo_peak_kib * 1024 / 1e6,
    )


def print_table(rows: list[Row]) -> None:
    print(
        f"{'params':>10} {'clients':>7} {'model MB':>9} {'median round s':>15} "
        f"{'MB sent/client/round':>21} {'coord peak RSS MB':>18} {'RSS/model':>10} "
        f"{'coord CPU s/round':>18} {'clients CPU s/round':>20} {'silo peak RSS MB':>17} "
        f"{'silo RSS/model':>15}"
    )
    for r in rows:
        print(
            f"{r.params:>10,} {r.clients:>7} {r.model_mb:>9.1f} {r.median_round_s:>15.3f} "
            f"{r.sent_per_client_mb:>21.3f} {r.coordinator_peak_rss_mb:>18.0f} {r.rss_ratio:>9.2f}x "
            f"{r.coordinator_cpu_s:>18.2f} {r.clients_cpu_s:>20.2f} {r.silo_peak_rss_mb:>17.0f} "
            f"{r.silo_rss_ratio:>14.2f}x"
        )
    for r in rows:
        if r.params >= 50_000_000 and r.clients >= 8:
            verdict = "PASS" if r.rss_ratio < RSS_LIMIT_FACTOR else "FAIL"
            print(
                f"target: coordinator peak RSS < {RSS_LIMIT_FACTOR:.0f}x model bytes at "
                f"P={r.params:,}, N={r.clients}: {r.rss_ratio:.2f}x -> {verdict}"
            )
    for r in rows:
        # One model of memory in both processes (a streamed sum, a reused receive buffer).
        if r.params >= 50_000_000 and r.strategy not in ROBUST:
            for who, ratio in (("coordinator", r.rss_ratio), ("every silo", r.silo_rss_ratio)):
                verdict = "PASS" if ratio <= ONE_MODEL_FACTOR else "MISS"
                print(
                    f"target: {who} peak RSS <= {ONE_MODEL_FACTOR:g}x model bytes at "
                    f"P={r.params:,}, N={r.clients}: {ratio:.2f}x -> {verdict}"
                )
    for r in rows:
        if r.strategy in ROBUST:
            verdict = "PASS" if r.rss_ratio < ROBUST_RSS_LIMIT_FACTOR else "MISS"
            print(
                f"target: {r.strategy.value} coordinator peak RSS < "
                f"{ROBUST_RSS_LIMIT_FACTOR:.0f}x model bytes at P={r.params:,}, "
                f"N={r.clients}: {r.rss_ratio:.2f}x -> {verdict}"
            )


def parse_sizes(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    *,
    params: tuple[int, ...] = (1_000_000, 10_000_000, 50_000_000),
    clients: tuple[int, ...] = (2, 8),
    smoke_clients: int = 2,
    rounds: int = 3,
) -> argparse.Namespace:
    """Add the options every round benchmark takes (--params, --clients, --rounds, --smoke) and parse."""
    parser.add_argument("--params", type=int, nargs="+", default=list(params))
    parser.add_argument("--clients", type=int, nargs="+", default=list(clients))
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument(
        "--smoke", action="store_true", help=f"tiny sizes: P=10k, N={smoke_clients}, 2 rounds"
    )
    args = parser.parse_args(argv)
    # The benchmark's CA is thrown away with its folder; its unencrypted key is fine.
    logging.getLogger("fedpriv.pki").setLevel(logging.ERROR)
    if args.smoke:
        args.params, args.clients, args.rounds = [10_000], [smoke_clients], 2
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--chunk-bytes",
        type=int,
        default=DEFAULT_CHUNK_BYTES,
        help=f"the model's chunk size (default {DEFAULT_CHUNK_BYTES}, at most {MAX_CHUNK_BYTES})",
    )
    parser.add_argument(
        "--insecure", action="store_true", help="plain-text gRPC everywhere (default: mTLS)"
    )
    parser.add_argument(
        "--strategy",
        type=StrategyName,
        default=StrategyName.FEDAVG,
        choices=list(StrategyName),
        metavar="NAME",
        help="a native strategy: " + ", ".join(n.value for n in StrategyName) + " (default fedavg)",
    )
    parser.add_argument(
        "--silo-app",
        choices=sorted(SILO_APPS),
        default="numpy",
        help="numpy (default): arrays perturbed in place; torch: a TorchClient taking one "
        "SGD step (its gradient is a model's worth too); torch-copy: the same with the model "
        "copied into its parameters instead of received into them",
    )
    args = parse_sizes(parser, argv)
    rows = []
    for params in args.params:
        for clients in args.clients:
            with tempfile.TemporaryDirectory(prefix="fedpriv-bench-") as tmp:
                started = time.monotonic()
                rows.append(
                    run_one(
                        params,
                        clients,
                        args.rounds,
                        pathlib.Path(tmp),
                        chunk_bytes=args.chunk_bytes,
                        insecure=args.insecure,
                        strategy=args.strategy,
                        silo_app=args.silo_app,
                    )
                )
                print(
                    f"# P={params:,} N={clients} done in {time.monotonic() - started:.0f} s",
                    file=sys.stderr,
                )
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
