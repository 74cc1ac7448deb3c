"""Secure aggregation at scale: N silos, as threads, against one coordinator process.

A real ``fedpriv coordinator`` process (mTLS, port 0, ``secure_aggregation =
true`` with the default ``[secagg]`` plan) runs R rounds of FedAvg. The silos
are the SDK itself: each is ``fedpriv.client.run_client`` in a thread, N
threads spread over W worker processes, with a client whose training adds 1e-3
to every weight. Every silo runs the whole secure-aggregation client: key
agreement, the jointly fixed graph seed, Shamir shares to its neighbours, the
fused encode + mask, and the reveal.

Printed for each N: the graph the coordinator planned (k, t, dropouts it
tolerates), each silo's keystream bytes per round (k + 1 masks; the complete
graph's N beside it), the rounds committed, the median round time (the
coordinator's, from its SQLite store: start to commit), the median silo encode
+ mask (from the silos' logs; the silos share this machine's cores), the
coordinator's unmask time (from its log), and its peak RSS (the kernel's
high-water mark) against the model's bytes.

    python benchmarks/secagg_load.py                              # N=100, P=10k, 3 rounds
    python benchmarks/secagg_load.py --silos 32 64 100 --params 1000000
    python benchmarks/secagg_load.py --silos 100 --drop 0.1       # 10 drop after sharing
    python benchmarks/secagg_load.py --smoke                      # tiny, for the test suite
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import math
import pathlib
import queue
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.bench_app import model_arrays  # noqa: E402
from benchmarks.load_bench import CoordinatorProcess, _lines, _tls  # noqa: E402
from fedpriv.coordinator import SecAggConfig, write_checkpoint  # noqa: E402
from fedpriv.pki import CertificateAuthority, Role  # noqa: E402
from fedpriv.wire import Model  # noqa: E402


class AddsOne:
    """A silo's training: every weight + 1e-3 (the update's norm stays under the clip).

    With `drops`, training fails every round: the silo has shared its keys and
    sends nothing, so it drops after sharing.
    """

    def __init__(self, *, drops: bool = False) -> None:
        self.drops = drops

    def fit(self, parameters: Mapping[str, Any], *, config: Mapping[str, Any]) -> Any:
        from fedpriv.client import FitResult

        if self.drops:
            raise RuntimeError("this benchmark silo drops after sharing")

        update = {k: np.asarray(v) + np.float32(1e-3) for k, v in parameters.items()}
        return FitResult(parameters=update, num_examples=100, metrics={})

    def evaluate(self, parameters: Mapping[str, Any], *, config: Mapping[str, Any]) -> Any:
        from fedpriv.client import EvaluateResult

        return EvaluateResult(num_examples=100, metrics={"loss": 0.0})


class _Timings(logging.Handler):
    """Collects encode_mask_s from the SDK's "masked update sent" log lines."""

    def __init__(self, out: queue.Queue[str]) -> None:
        super().__init__(logging.INFO)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        if found := re.search(r"encode_mask_s=([0-9.]+)", record.getMessage()):
            self.out.put(json.dumps({"encode_mask_s": float(found.group(1))}))


def worker_main(work: pathlib.Path, port: int, names: list[str], dropping: set[str]) -> int:
    """A worker process: one SDK silo per thread; records go to stdout as JSON lines."""
    from fedpriv.client import run_client

    out: queue.Queue[str] = queue.Queue()
    logging.getLogger("fedpriv.client.secure").addHandler(_Timings(out))
    logging.getLogger("fedpriv.client.secure").setLevel(logging.INFO)

    def silo(name: str) -> None:
        try:
            stats = run_client(
                AddsOne(drops=name in dropping),
                coordinator=f"127.0.0.1:{port}",
                tls=_tls(work, name),
                reconnect_timeout_s=120,
            )
            out.put(json.dumps({"done": name, "trained": stats.trained}))
        except Exception as err:  # reported: the run goes on without this silo
            out.put(json.dumps({"done": name, "error": f"{type(err).__name__}: {err}"}))

    threads = [threading.Thread(target=silo, args=(n,), daemon=True) for n in names]
    for thread in threads:
        thread.start()
    finished = 0
    while finished < len(threads):
        line = out.get()
        print(line, flush=True)
        finished += '"done"' in line
    return 0


@dataclass
class Result:
    silos: int
    params: int
    degree: int
    threshold: int
    dropped: int
    masks_per_silo: int
    committed: int
    rounds: int
    round_s: float
    encode_mask_s: float
    unmask_s: float
    peak_rss_mb: float
    errors: list[str]
    elapsed_s: float
    # Silos that shared keys and sent nothing, per unmasked round (the coordinator's log).
    dropped_after_sharing: list[int]

    @property
    def model_mb(self) -> float:
        return 4 * self.params / 1e6


def write_setup(
    work: pathlib.Path, silos: int, params: int, rounds: int, *, secure: bool = True, drop: int = 0
) -> None:
    ca = CertificateAuthority.create(work / "pki", federation="secagg-load")
    ca.issue("coordinator", role=Role.SERVER, out_dir=work / "pki", hosts=["127.0.0.1"])
    for k in range(silos):
        ca.issue(f"silo-{k}", role=Role.CLIENT, out_dir=work / "pki")
    write_checkpoint(work / "initial.fpck", Model.from_arrays(model_arrays(params)))
    (work / "coordinator.toml").write_text(
        f"""secure_aggregation = {str(secure).lower()}
[server]
address = "127.0.0.1:0"
poll_wait_s = 5
[tls]
ca = "{work}/pki/ca.crt"
cert = "{work}/pki/coordinator.crt"
key = "{work}/pki/coordinator.key"
[rounds]
num_rounds = {rounds}
min_clients = {silos}
min_results = {silos - drop}
deadline_s = {120 + silos * (2 + params / 250_000)}
federated_evaluation = false
[model]
checkpoint = "{work}/initial.fpck"
[store]
dir = "{work}/state"
"""
        + ("[secagg]\nclip_norm = 100.0\n" if secure else "")
    )


def run(
    silos: int, params: int, rounds: int, workers: int, *, secure: bool = True, drop: float = 0.0
) -> Result:
    """One federation of `silos` SDK silos, with secure aggregation unless not `secure`.

    A `drop` fraction of them (rounded down) drops after sharing, every round.
    """
    plan = SecAggConfig().graph_for(silos)
    with tempfile.TemporaryDirectory(prefix="fedpriv-secagg-load-") as tmp:
        work = pathlib.Path(tmp)
        dropping = math.floor(drop * silos + 1e-9)
        write_setup(work, silos, params, rounds, secure=secure, drop=dropping)
        started = time.monotonic()
        coordinator = CoordinatorProcess(work)
        assert coordinator.wait_for(lambda: coordinator.port is not None, 120), "no port reported"
        names = [f"silo-{k}" for k in range(silos)]
        records: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        processes = []
        for w in range(min(workers, silos)):
            process = subprocess.Popen(
                [
                    sys.executable,
                    str(pathlib.Path(__file__).resolve()),
                    "--worker",
                    str(work),
                    str(coordinator.port),
                    ",".join(names[w::workers]),
                    ",".join(names[:dropping]),
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
            processes.append(process)
            threading.Thread(target=_lines, args=(process, records, 0), daemon=True).start()
        code, usage = coordinator.wait()
        for process in processes:
            process.wait(180)
        elapsed = time.monotonic() - started
        encode: list[float] = []
        errors = [] if code == 0 else [f"coordinator exit {code}"]
        while not records.empty():
            _, record = records.get()
            if "encode_mask_s" in record:
                encode.append(record["encode_mask_s"])
            elif "error" in record:
                errors.append(f"{record['done']}: {record['error']}")
        log = (work / "coordinator.log").read_text()
        unmask = [float(v) for v in re.findall(r"unmask_s=([0-9.]+)", log)]
        gone = [int(v) for v in re.findall(r"unmasked round=\d+ survivors=\d+ dropped=(\d+)", log)]
        durations: list[float] = []
        with (
            contextlib.suppress(sqlite3.Error),
            contextlib.closing(sqlite3.connect(work / "state" / "state.sqlite3")) as db,
        ):
            durations = [
                finished - begun
                for begun, finished in db.execute(
                    "SELECT started_unix_s, finished_unix_s FROM rounds WHERE round > 0"
                )
            ]
    return Result(
        silos=silos,
        params=params,
        degree=plan.degree,
        threshold=plan.threshold,
        dropped=plan.dropped,
        masks_per_silo=plan.masks_per_silo,
        committed=len(durations),
        rounds=rounds,
        round_s=statistics.median(durations) if durations else float("nan"),
        encode_mask_s=statistics.median(encode) if encode else float("nan"),
        unmask_s=statistics.median(unmask) if unmask else float("nan"),
        peak_rss_mb=usage.ru_maxrss * 1024 / 1e6,  # Linux reports KiB
        errors=errors,
        elapsed_s=elapsed,
        dropped_after_sharing=gone,
    )


def _summary(errors: list[str]) -> str:
    """Each distinct error once, with how many parties saw it."""
    if not errors:
        return "none"
    seen = collections.Counter(e.split(": ", 1)[-1] for e in errors)
    return "; ".join(f"{count} x {text}" for text, count in seen.most_common())


def print_results(results: list[Result], workers: int, *, secure: bool = True) -> None:
    print(
        f"{'secure' if secure else 'plain (no secure)'} aggregation, SDK silos as threads in "
        f"{workers} worker processes, mTLS, default [secagg] plan (the graph columns: what it "
        "would be); all processes share this machine's cores"
    )
    print(
        f"{'silos':>5} {'params':>10} {'k':>3} {'t':>3} {'drops ok':>8} {'keystream MB':>12} "
        f"{'complete MB':>11} {'rounds':>6} {'round s':>8} {'encode+mask s':>13} "
        f"{'unmask s':>8} {'coord peak RSS MB':>17} {'x model':>7}"
    )
    for r in results:
        mine = 4 * r.params * r.masks_per_silo / 1e6
        full = 4 * r.params * r.silos / 1e6
        print(
            f"{r.silos:>5} {r.params:>10,} {r.degree:>3} {r.threshold:>3} {r.dropped:>8} "
            f"{mine:>12.1f} {full:>11.1f} {r.committed:>3}/{r.rounds:<2} {r.round_s:>8.2f} "
            f"{r.encode_mask_s:>13.3f} {r.unmask_s:>8.3f} {r.peak_rss_mb:>17.0f} "
            f"{r.peak_rss_mb / r.model_mb:>6.1f}x"
        )
    for r in results:
        verdict = "PASS" if r.committed == r.rounds and not r.errors else "MISS"
        print(
            f"N={r.silos}: {r.committed} of {r.rounds} rounds committed in {r.elapsed_s:.0f} s "
            f"-> {verdict}; dropped after sharing, by round: {r.dropped_after_sharing or '-'}; "
            f"errors: {_summary(r.errors)}"
        )


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--worker":
        dropping = set(filter(None, argv[4].split(","))) if len(argv) > 4 else set()
        return worker_main(pathlib.Path(argv[1]), int(argv[2]), argv[3].split(","), dropping)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--silos", type=int, nargs="+", default=[100])
    parser.add_argument("--params", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4, help="processes the silo threads share")
    parser.add_argument(
        "--plain", action="store_true", help="the same federations without secure aggregation"
    )
    parser.add_argument(
        "--drop",
        type=float,
        default=0.0,
        help="fraction of the silos that drop after sharing, every round (default 0)",
    )
    parser.add_argument("--smoke", action="store_true", help="5 silos, 1k params, 1 round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.silos, args.params, args.rounds, args.workers = [5], 1_000, 1, 2
    logging.getLogger("fedpriv.pki").setLevel(logging.ERROR)  # a throwaway CA
    results = []
    for silos in args.silos:
        results.append(
            run(
                silos,
                args.params,
                args.rounds,
                args.workers,
                secure=not args.plain,
                drop=args.drop,
            )
        )
        print(f"# N={silos} done in {results[-1].elapsed_s:.0f} s", file=sys.stderr)
    print_results(results, args.workers, secure=not args.plain)
    return 0 if all(r.committed == r.rounds and not r.errors for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
