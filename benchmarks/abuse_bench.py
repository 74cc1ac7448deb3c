"""Honest round time while one identity holds header-less upload streams open.

A coordinator (in this process, default ``[limits]``) and N honest silos
(threads here) run R rounds of FedAvg over mTLS on a small model, first
without an attack, then while an abuser, a separate process with its own
certificate, opens 80 and then 500 ``PushResult`` streams that never send a
byte and opens each again whenever the coordinator ends it. Each row gives
the median round time (rounds 2..R of every repeat; round 1 includes the
joins), its ratio to the runs without the attack, PASS when the ratio is at
most 1.2, and the statuses the abuser's streams ended with. The runs are
interleaved (none, 80, 500, none, ...) so that a machine's drifting load
falls on every row alike.

    python benchmarks/abuse_bench.py                 # 3 silos, 20 rounds, 3 repeats, P = 100k
    python benchmarks/abuse_bench.py --smoke         # 2 silos, 3 rounds, 1 repeat, P = 10k
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import logging
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from fedpriv.coordinator import Coordinator, CoordinatorConfig, write_checkpoint  # noqa: E402
from fedpriv.coordinator.config import ModelSource, RoundConfig, TLSFiles  # noqa: E402
from fedpriv.pki import CertificateAuthority, Role  # noqa: E402
from fedpriv.wire import Model  # noqa: E402

ABUSER = "abuser"
MAX_RATIO = 1.2


@dataclasses.dataclass
class Row:
    attack: str
    round_s: list[float]
    abuser_codes: collections.Counter[str]

    @property
    def median_round_s(self) -> float:
        return statistics.median(self.round_s)


class _Rounds:
    def __init__(self) -> None:
        self.durations: list[float] = []

    def round_completed(self, summary) -> None:  # type: ignore[no-untyped-def]
        self.durations.append(summary.duration_s)

    def round_failed(self, round: int, reason: str) -> None:
        raise SystemExit(f"round {round} failed: {reason}")


class _Client:
    def __init__(self, delta: float) -> None:
        self.delta = delta

    def fit(self, parameters, *, config):  # type: ignore[no-untyped-def]
        from fedpriv.client import FitResult

        update = {k: (v + self.delta).astype(v.dtype) for k, v in parameters.items()}
        return FitResult(parameters=update, num_examples=10, metrics={})

    def evaluate(self, parameters, *, config):  # type: ignore[no-untyped-def]
        from fedpriv.client import EvaluateResult

        return EvaluateResult(num_examples=10, metrics={})


def make_pki(work: pathlib.Path, silos: int) -> pathlib.Path:
    pki = work / "pki"
    ca = CertificateAuthority.create(pki, federation="abuse-bench")
    ca.issue("coordinator", role=Role.SERVER, out_dir=pki, hosts=["127.0.0.1"])
    for name in [*(f"silo-{k}" for k in range(silos)), ABUSER]:
        ca.issue(name, role=Role.CLIENT, out_dir=pki)
    return pki


@contextlib.contextmanager
def abuser(pki: pathlib.Path, port: int, streams: int) -> Iterator[subprocess.Popen[str]]:
    """The abuser process; yields once every stream past the cap was refused."""
    process = subprocess.Popen(
        [sys.executable, __file__, "--abuse", str(port), "--streams", str(streams), str(pki)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    try:
        line = process.stdout.readline()
        if line.strip() != "ready":
            raise SystemExit(f"the abuser did not start: {line!r}")
        yield process
    finally:
        process.send_signal(signal.SIGINT)


def run(
    work: pathlib.Path,
    pki: pathlib.Path,
    *,
    silos: int,
    rounds: int,
    params: int,
    streams: int,
    repeat: int,
) -> tuple[list[float], dict[str, int]]:
    """One federation of `rounds` rounds; its round times (from round 2) and the abuser's
    statuses."""
    from fedpriv.client import run_client
    from fedpriv.transport import TLSConfig

    name = "none" if streams == 0 else f"{streams} streams"
    run_dir = work / f"{name.replace(' ', '-')}-{repeat}"
    run_dir.mkdir()
    checkpoint = run_dir / "initial.fpck"
    write_checkpoint(checkpoint, Model.from_arrays({"w": np.zeros(params, np.float32)}))
    config = CoordinatorConfig(
        address="127.0.0.1:0",
        tls=TLSFiles(ca=pki / "ca.crt", cert=pki / "coordinator.crt", key=pki / "coordinator.key"),
        rounds=RoundConfig(
            num_rounds=rounds, min_clients=silos, federated_evaluation=False, deadline_s=60
        ),
        model=ModelSource(checkpoint=checkpoint),
        state_dir=run_dir / "state",
        heartbeat_interval_s=1,
        poll_wait_s=2,
    )
    reporter = _Rounds()
    codes: dict[str, int] = {}
    with Coordinator(config, reporter=reporter) as coordinator, contextlib.ExitStack() as stack:
        if streams:
            process = stack.enter_context(abuser(pki, coordinator.port, streams))
            if not coordinator.limits.slots.wait_for(
                ABUSER, config.limits.max_streams_per_identity, timeout_s=60
            ):
                raise SystemExit("the abuser's streams were not held")
        stop = threading.Event()
        threads = []
        for k in range(silos):
            tls = TLSConfig.from_files(
                ca=pki / "ca.crt", cert=pki / f"silo-{k}.crt", key=pki / f"silo-{k}.key"
            )
            thread = threading.Thread(
                target=run_client,
                args=(_Client(1.0 + k),),
                kwargs={
                    "coordinator": f"127.0.0.1:{coordinator.port}",
                    "tls": tls,
                    "poll_wait_s": 2,
                    "stop": stop,
                },
                daemon=True,
            )
            thread.start()
            threads.append(thread)
        if not coordinator.wait(timeout_s=600):
            raise SystemExit(f"{name}: the rounds did not finish")
        stop.set()
        for thread in threads:
            thread.join(30)
        if streams:
            process.send_signal(signal.SIGINT)
            out, _ = process.communicate(timeout=60)
            codes = json.loads(out.strip().splitlines()[-1])
    if len(reporter.durations) != rounds:
        raise SystemExit(f"{name}: {len(reporter.durations)} of {rounds} rounds completed")
    return reporter.durations[1:] or reporter.durations, codes


def abuse(port: int, streams: int, pki: pathlib.Path) -> None:
    """Hold `streams` header-less PushResult streams open until SIGINT; print the statuses."""
    import grpc

    from fedpriv.transport import TLSConfig, open_channel
    from fedpriv.v1 import fleet_pb2_grpc

    tls = TLSConfig.from_files(
        ca=pki / "ca.crt", cert=pki / f"{ABUSER}.crt", key=pki / f"{ABUSER}.key"
    )
    channel = open_channel(f"127.0.0.1:{port}", tls=tls)
    grpc.channel_ready_future(channel).result(timeout=30)
    stub = fleet_pb2_grpc.FleetStub(channel)
    release = threading.Event()
    stopping = threading.Event()
    lock = threading.Condition()
    codes: collections.Counter[str] = collections.Counter()

    def silence() -> Iterator[bytes]:
        release.wait()
        yield from ()

    def ended(future: grpc.Future) -> None:
        code = future.code()
        with lock:
            expected = code in (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
            codes[code.name if expected else f"{code.name} ({(future.details() or '')[:60]})"] += 1
            lock.notify_all()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and not stopping.is_set():
            open_one()

    def open_one() -> None:
        stub.PushResult.future(silence(), timeout=3600).add_done_callback(ended)

    for _ in range(streams):
        open_one()
    with lock:
        lock.wait_for(lambda: sum(codes.values()) >= streams - 4, timeout=120)
    print("ready", flush=True)
    signal.sigwait([signal.SIGINT])
    stopping.set()
    # Closed before the request iterators end: an iterator that ended first would
    # send an empty stream, which the coordinator rightly refuses.
    channel.close()
    release.set()
    # Streams still held when the abuser stops end CANCELLED: its own doing.
    print(json.dumps({k: v for k, v in codes.items() if not k.startswith("CANCELLED")}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--silos", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--abuse", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--streams", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("pki", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.abuse is not None:
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
        abuse(args.abuse, args.streams, pathlib.Path(args.pki))
        return
    logging.basicConfig(level=logging.ERROR)
    if args.smoke:
        args.silos, args.rounds, args.repeats, args.params = 2, 3, 1, 10_000
    attacks = {0: "none", 80: "80 streams", 500: "500 streams"}
    rows = {n: Row(name, [], collections.Counter()) for n, name in attacks.items()}
    with tempfile.TemporaryDirectory(prefix="fedpriv-abuse-") as tmp:
        work = pathlib.Path(tmp)
        pki = make_pki(work, args.silos)
        common = {"silos": args.silos, "rounds": args.rounds, "params": args.params}
        for repeat in range(args.repeats):
            for streams, row in rows.items():
                times, codes = run(work, pki, streams=streams, repeat=repeat, **common)
                row.round_s.extend(times)
                row.abuser_codes.update(codes)
    baseline = rows[0].median_round_s
    print(
        f"{args.silos} silos, {args.rounds} rounds x {args.repeats} repeats, "
        f"P = {args.params:,} float32, mTLS, default [limits]; the abuser is a separate process"
    )
    print(
        f"{'attack':<12} {'rounds':>6} {'median round s':>15} {'ratio':>6}  result  abuser's streams"
    )
    for row in rows.values():
        ratio = row.median_round_s / baseline
        result = "-" if row is rows[0] else ("PASS" if ratio <= MAX_RATIO else "MISS")
        seen = ", ".join(f"{k} {v}" for k, v in sorted(row.abuser_codes.items())) or "-"
        print(
            f"{row.attack:<12} {len(row.round_s):>6} {row.median_round_s:>15.4f} {ratio:>6.2f}  "
            f"{result:<6}  {seen}"
        )


if __name__ == "__main__":
    main()
