"""100 silos, 200 idle streams and a silo uploading one byte per second, against one coordinator.

A real ``fedpriv coordinator`` process (mTLS, port 0: the port it reports in its
log) runs 2R rounds of FedAvg on a small model. The silos are raw Fleet clients
built on the SDK's message encoders, as threads: N silos spread over W worker
processes. One more silo takes part in every round but uploads one byte per
second, so every round waits for it until the round's deadline; it is there in
both halves of the run. After round R, an attacker process opens S PushResult
streams under one identity and never sends on them (idle streams) until the
last round's honest uploads are in.

Printed: each round's honest time (from the first honest silo receiving its
task to the last honest upload accepted), the median without and with the idle
streams and their ratio (PASS within 1.2x); the coordinator's RSS at 0, 1/W,
..., N connected silos (from /proc), its peak RSS (the kernel's high-water
mark) and the growth per connected silo over the one-model baseline (PASS at
most 5 MB); its CPU; and the errors each party saw, by category.

    python benchmarks/load_bench.py                  # N=100, W=4, R=5, S=200
    python benchmarks/load_bench.py --silos 20 --idle-streams 40
    python benchmarks/load_bench.py --smoke          # tiny, for the test suite
    python benchmarks/load_bench.py --secure         # 3 rounds of 100 SDK silos, secure aggregation

``--secure`` runs ``benchmarks/secagg_load.py`` (its options: --silos, --params,
--rounds, --workers, --plain, --smoke): real SDK silos as threads, each
running the whole secure-aggregation client, and prints each round's time and
the coordinator's peak RSS.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import pathlib
import queue
import re
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.bench_app import model_arrays  # noqa: E402
from fedpriv.client import ClientStats  # noqa: E402
from fedpriv.client.messages import result_messages  # noqa: E402
from fedpriv.coordinator import write_checkpoint  # noqa: E402
from fedpriv.pki import CertificateAuthority, Role  # noqa: E402
from fedpriv.transport import TLSConfig, open_channel  # noqa: E402
from fedpriv.v1 import fleet_pb2, fleet_pb2_grpc, tensor_pb2  # noqa: E402
from fedpriv.wire import Model, PayloadAssembler, layout_from_proto, scalars_to_proto  # noqa: E402
from fedpriv.wire.frames import serialize  # noqa: E402

RATIO_TARGET = 1.2
RSS_SLOPE_TARGET_MB = 5.0
PUSH = "/fedpriv.v1.Fleet/PushResult"


# ---- the parties ----------------------------------------------------------------------------


def _tls(work: pathlib.Path, name: str) -> TLSConfig:
    pki = work / "pki"
    return TLSConfig.from_files(
        ca=pki / "ca.crt", cert=pki / f"{name}.crt", key=pki / f"{name}.key"
    )


def _pull(stub: Any) -> tuple[fleet_pb2.Task, Any, np.ndarray | None]:
    """One PullTask: the task, its layout and the model's payload (None without a model)."""
    messages = list(stub.PullTask(fleet_pb2.PullTaskRequest(wait_s=5), timeout=120))
    task = messages[0].task
    if task.kind not in (fleet_pb2.TASK_KIND_TRAIN, fleet_pb2.TASK_KIND_EVALUATE):
        return task, None, None
    layout, problems = layout_from_proto(task.model)
    assert layout is not None, problems
    assembler = PayloadAssembler(layout)
    for message in messages[1:]:
        assembler.add(message.chunk.offset, message.chunk.data)
    return task, layout, assembler.finish()


def honest_silo(work: pathlib.Path, port: int, name: str, out: queue.Queue[str]) -> None:
    """Train (add 1e-3) and upload every round until FINISHED; report each round's times."""
    errors: collections.Counter[str] = collections.Counter()
    try:
        _honest_rounds(work, port, name, out, errors)
    except Exception as err:  # counted and reported: the run goes on without this silo
        errors[f"crashed {type(err).__name__}"] += 1
    finally:
        out.put(json.dumps({"errors": dict(errors)}))


def _honest_rounds(
    work: pathlib.Path,
    port: int,
    name: str,
    out: queue.Queue[str],
    errors: collections.Counter[str],
) -> None:
    with open_channel(f"127.0.0.1:{port}", tls=_tls(work, name)) as channel:
        stub = fleet_pb2_grpc.FleetStub(channel)
        push = channel.stream_unary(PUSH)
        stub.Join(fleet_pb2.JoinRequest(sdk_version="load-bench"), timeout=120)
        out.put(json.dumps({"joined": name}))
        failures = 0
        while True:
            try:
                task, layout, payload = _pull(stub)
                failures = 0
            except grpc.RpcError as err:
                errors[f"PullTask {err.code().name}"] += 1
                failures += 1
                if failures >= 30:  # the coordinator is gone
                    break
                continue
            if task.kind == fleet_pb2.TASK_KIND_FINISHED:
                break
            if layout is None or payload is None:
                continue
            received = time.time()
            header = fleet_pb2.ResultHeader(
                task_id=task.task_id,
                round=task.round,
                kind=task.kind,
                num_examples=100,
                metrics=scalars_to_proto({"loss": 0.5}),
            )
            update = None
            if task.kind == fleet_pb2.TASK_KIND_TRAIN:
                arrays = Model(layout=layout, payload=payload).arrays()
                update = {k: v + np.float32(1e-3) for k, v in arrays.items()}
                header.update.CopyFrom(layout.to_proto())
            messages = result_messages(header, layout if update else None, update, ClientStats())
            try:
                # Chunk frames are bytes already: sent as they are, as the SDK does.
                push(map(serialize, messages), timeout=300)
            except grpc.RpcError as err:
                errors[f"PushResult {err.code().name}"] += 1
                continue
            if task.kind == fleet_pb2.TASK_KIND_TRAIN:
                out.put(
                    json.dumps({"round": task.round, "received": received, "accepted": time.time()})
                )
    out.put(json.dumps({"errors": dict(errors)}))


def slow_silo(work: pathlib.Path, port: int, stop: threading.Event, report: dict[str, Any]) -> None:
    """Take part in every round; upload the header, then one byte per second until cut off."""
    codes: collections.Counter[str] = collections.Counter()
    with open_channel(f"127.0.0.1:{port}", tls=_tls(work, "slow")) as channel:
        stub = fleet_pb2_grpc.FleetStub(channel)
        stub.Join(fleet_pb2.JoinRequest(sdk_version="load-bench"), timeout=120)
        while not stop.is_set():
            try:
                task, layout, _ = _pull(stub)
            except grpc.RpcError as err:
                codes[f"PullTask {err.code().name}"] += 1
                continue
            if task.kind == fleet_pb2.TASK_KIND_FINISHED:
                break
            if layout is None or task.kind != fleet_pb2.TASK_KIND_TRAIN:
                continue
            header = fleet_pb2.ResultHeader(
                task_id=task.task_id,
                round=task.round,
                kind=task.kind,
                num_examples=100,
                update=layout.to_proto(),
            )

            def trickle(
                header: fleet_pb2.ResultHeader = header,
            ) -> Iterator[fleet_pb2.ResultMessage]:
                yield fleet_pb2.ResultMessage(header=header)
                offset = 0
                while not stop.wait(1.0):  # one byte per second, until the round cuts it off
                    yield fleet_pb2.ResultMessage(
                        chunk=tensor_pb2.TensorChunk(offset=offset, data=b"\x00")
                    )
                    offset += 1

            try:
                stub.PushResult(trickle(), timeout=600)
                codes["PushResult OK"] += 1
            except grpc.RpcError as err:
                codes[f"PushResult {err.code().name}"] += 1
    report["slow"] = dict(codes)


def worker_main(work: pathlib.Path, port: int, names: list[str]) -> int:
    """A worker process: one thread per silo; every record goes to stdout as a JSON line."""
    out: queue.Queue[str] = queue.Queue()
    threads = [
        threading.Thread(target=honest_silo, args=(work, port, name, out), daemon=True)
        for name in names
    ]
    for thread in threads:
        thread.start()
    finished = 0
    while finished < len(threads):
        line = out.get()
        print(line, flush=True)
        finished += '"errors"' in line
    return 0


def attacker_main(work: pathlib.Path, port: int, streams: int) -> int:
    """Open `streams` PushResult streams under one identity, send nothing, until stdin closes."""
    release = threading.Event()

    def nothing() -> Iterator[bytes]:
        release.wait()
        return
        yield b""  # a generator that never yields before release

    channels = [
        grpc.secure_channel(f"127.0.0.1:{port}", _tls(work, "attacker").channel_credentials())
        for _ in range(max(1, streams // 50))  # at most 50 streams per connection
    ]
    calls = [
        channels[k % len(channels)].stream_unary(PUSH).future(nothing(), timeout=3600)
        for k in range(streams)
    ]
    print(json.dumps({"opened": streams}), flush=True)
    sys.stdin.read()  # the bench closes stdin when the last round's honest uploads are in
    ended_early = collections.Counter(
        call.exception().code().name for call in calls if call.done() and call.exception()
    )
    release.set()
    for call in calls:
        call.cancel()
    for channel in channels:
        channel.close()
    print(json.dumps({"ended_before_release": dict(ended_early)}), flush=True)
    return 0


# ---- the coordinator ------------------------------------------------------------------------


class CoordinatorProcess:
    """``fedpriv coordinator`` with its log read line by line (port, joins, outcomes)."""

    def __init__(self, work: pathlib.Path) -> None:
        self.log = open(work / "coordinator.log", "w")  # noqa: SIM115  # closed in wait()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedpriv",
                "--log-level",
                "INFO",
                "coordinator",
                "--quiet",
                "--config",
                str(work / "coordinator.toml"),
            ],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.port: int | None = None
        self.joined = 0
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.levels: collections.Counter[str] = collections.Counter()
        self._changed = threading.Condition()
        self.ended = threading.Event()  # its log closed: it exited (reaped by wait())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.write(line)
            with self._changed:
                if self.port is None and (
                    found := re.search(r"coordinator listening port=(\d+)", line)
                ):
                    self.port = int(found.group(1))
                if "joined silo=" in line:
                    self.joined += 1
                if found := re.search(r" outcome=(\w+)", line):
                    self.outcomes[found.group(1)] += 1
                if found := re.match(r"\S+ \S+ (WARNING|ERROR|CRITICAL) ", line):
                    self.levels[found.group(1)] += 1
                self._changed.notify_all()
        with self._changed:
            self.ended.set()
            self._changed.notify_all()

    def wait_for(self, predicate: Any, timeout_s: float) -> bool:
        with self._changed:
            return (
                self._changed.wait_for(
                    lambda: predicate() or self.ended.is_set(), timeout=timeout_s
                )
                and predicate()
            )

    def rss_mb(self) -> float:
        status = pathlib.Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024 / 1e6  # type: ignore[union-attr]

    def wait(self) -> tuple[int, resource.struct_rusage]:
        _, status, usage = os.wait4(self.process.pid, 0)
        self.process.returncode = os.waitstatus_to_exitcode(status)
        self._reader.join(10)
        self.log.close()
        return self.process.returncode, usage


# ---- the run --------------------------------------------------------------------------------


def write_setup(work: pathlib.Path, args: argparse.Namespace) -> None:
    ca = CertificateAuthority.create(work / "pki", federation="load")
    ca.issue("coordinator", role=Role.SERVER, out_dir=work / "pki", hosts=["127.0.0.1"])
    for name in [*(f"silo-{k}" for k in range(args.silos)), "slow", "attacker"]:
        ca.issue(name, role=Role.CLIENT, out_dir=work / "pki")
    write_checkpoint(
        work / "initial.fpck",
        Model.from_arrays(model_arrays(args.params), chunk_bytes=args.chunk_bytes),
    )
    (work / "coordinator.toml").write_text(f"""
[server]
address = "127.0.0.1:0"
poll_wait_s = 5
[tls]
ca = "{work}/pki/ca.crt"
cert = "{work}/pki/coordinator.crt"
key = "{work}/pki/coordinator.key"
[rounds]
num_rounds = {2 * args.rounds}
min_clients = {args.silos + 1}
# The slow silo never finishes an upload: the honest ones are enough.
min_results = {args.silos}
# A round the idle streams stall is retried rather than ending the run.
max_failed_attempts = 50
deadline_s = {args.deadline_s}
federated_evaluation = false
[model]
checkpoint = "{work}/initial.fpck"
[store]
dir = "{work}/state"
""")


def _lines(
    process: subprocess.Popen[str], into: queue.Queue[tuple[int, dict[str, Any]]], tag: int
) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        with contextlib.suppress(json.JSONDecodeError):
            into.put((tag, json.loads(line)))


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="fedpriv-load-") as tmp:
        work = pathlib.Path(tmp)
        write_setup(work, args)
        started = time.monotonic()
        coordinator = CoordinatorProcess(work)
        assert coordinator.wait_for(lambda: coordinator.port is not None, 120), "no port reported"
        port = coordinator.port
        assert port is not None
        rss_steps = [(0, coordinator.rss_mb())]
        records: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        names = [f"silo-{k}" for k in range(args.silos)]
        groups = [names[w :: args.workers] for w in range(args.workers)]
        me = [sys.executable, str(pathlib.Path(__file__).resolve())]
        workers = []
        for group in groups:
            process = subprocess.Popen(
                [*me, "--worker", str(work), str(port), ",".join(group)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
            workers.append(process)
            threading.Thread(target=_lines, args=(process, records, 0), daemon=True).start()
            expected = sum(len(g) for g in groups[: len(workers)])
            coordinator.wait_for(lambda expected=expected: coordinator.joined >= expected, 300)
            rss_steps.append((coordinator.joined, coordinator.rss_mb()))
        stop_slow = threading.Event()
        slow_report: dict[str, Any] = {}
        slow = threading.Thread(
            target=slow_silo, args=(work, port, stop_slow, slow_report), daemon=True
        )
        slow.start()

        accepted: dict[int, list[tuple[float, float]]] = collections.defaultdict(list)
        silo_errors: collections.Counter[str] = collections.Counter()
        attacker: subprocess.Popen[str] | None = None
        attacker_reader: threading.Thread | None = None
        attack_report: dict[str, Any] = {}
        last = 2 * args.rounds
        # Under attack, no honest upload for this long means the federation stalled: the
        # idle streams are released so that the run ends (and the rounds after are MISS).
        stall_s = 2 * args.deadline_s + 30
        progress = time.monotonic()
        released_at: float | None = None
        workers_done = 0
        while workers_done < len(workers):
            try:
                tag, record = records.get(timeout=1)
            except queue.Empty:
                stalled = time.monotonic() - progress > stall_s
                if attacker is not None and released_at is None and stalled:
                    print(
                        f"# no honest upload for {stall_s:g} s with the idle streams open: "
                        "releasing them",
                        file=sys.stderr,
                    )
                    attacker.stdin.close()  # type: ignore[union-attr]
                    released_at = time.time()
                if coordinator.ended.is_set():
                    # It stopped (the federation failed, say): the silos would poll for ever.
                    for process in workers:
                        if process.poll() is None:
                            process.terminate()
                    break
                continue
            if tag == 1:
                attack_report.update(record)
                continue
            if "errors" in record:
                silo_errors.update(record["errors"])
                workers_done += 1
            elif "round" in record:
                rnd = record["round"]
                progress = time.monotonic()
                accepted[rnd].append((record["received"], record["accepted"]))
                if len(accepted[rnd]) == args.silos and rnd == args.rounds and args.idle_streams:
                    # Round R's honest uploads are in (it waits for the slow silo): open the
                    # idle streams now, so that rounds R+1..2R run with all of them open.
                    attacker = subprocess.Popen(
                        [*me, "--attacker", str(work), str(port), str(args.idle_streams)],
                        cwd=ROOT,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    attacker_reader = threading.Thread(
                        target=_lines, args=(attacker, records, 1), daemon=True
                    )
                    attacker_reader.start()
                if len(accepted[rnd]) == args.silos and rnd == last and attacker is not None:
                    if released_at is None:
                        attacker.stdin.close()  # type: ignore[union-attr]
                        released_at = time.time()
        stop_slow.set()
        if attacker is not None:
            if attacker.stdin and not attacker.stdin.closed:
                attacker.stdin.close()
            attacker.wait(60)
            if attacker_reader is not None:
                attacker_reader.join(30)  # it hands over the attacker's last line
            while not records.empty():
                tag, record = records.get()
                if tag == 1:
                    attack_report.update(record)
        code, usage = coordinator.wait()
        for process in workers:
            process.wait(60)
        slow.join(30)
        elapsed = time.monotonic() - started
        report(
            args,
            work,
            rss_steps,
            accepted,
            usage,
            code,
            coordinator,
            silo_errors,
            slow_report,
            attack_report,
            elapsed,
            released_at,
        )
    return 0


def under_attack_unfinished(accepted, args, released_at) -> bool:  # type: ignore[no-untyped-def]
    """Whether some attacked round's honest uploads finished only after the release."""
    return any(
        len(accepted.get(r, [])) < args.silos or max(a for _, a in accepted[r]) > released_at
        for r in range(args.rounds + 1, 2 * args.rounds + 1)
    )


def report(
    args,
    work,
    rss_steps,
    accepted,
    usage,
    code,
    coordinator,
    silo_errors,
    slow_report,
    attack_report,
    elapsed,
    released_at,
) -> None:  # type: ignore[no-untyped-def]
    print(
        f"load: {args.silos} silos as threads in {args.workers} worker processes (raw Fleet clients "
        f"on the SDK's encoders), {args.params:,} float32 params, {2 * args.rounds} rounds "
        f"({args.rounds} without, {args.rounds} with {args.idle_streams} idle PushResult streams "
        f"from one identity), one silo uploading 1 byte/s (every round waits for it until "
        f"deadline_s={args.deadline_s:g}); mTLS; {elapsed:.0f} s in all"
    )
    print(f"{'round':>5} {'idle streams':>12} {'honest accepted':>15} {'honest round s':>14}")
    honest = {}
    for rnd in range(1, 2 * args.rounds + 1):
        times = accepted.get(rnd, [])
        span = max(a for _, a in times) - min(r for r, _ in times) if times else float("nan")
        honest[rnd] = span
        idle = args.idle_streams if rnd > args.rounds else 0
        print(f"{rnd:>5} {idle:>12} {len(times):>11}/{args.silos:<3} {span:>14.3f}")
    # A round counts under attack only if its honest uploads were all in while the
    # streams were still open.
    complete = [
        r
        for r in honest
        if len(accepted.get(r, [])) == args.silos
        and (
            r <= args.rounds or released_at is None or max(a for _, a in accepted[r]) <= released_at
        )
    ]
    without = [honest[r] for r in range(1, args.rounds + 1) if r in complete]
    under = [honest[r] for r in range(args.rounds + 1, 2 * args.rounds + 1) if r in complete]
    with (
        contextlib.suppress(sqlite3.Error),
        contextlib.closing(sqlite3.connect(work / "state" / "state.sqlite3")) as db,
    ):
        committed = db.execute("SELECT COUNT(*) FROM rounds WHERE round > 0").fetchone()[0]
        print(f"rounds committed: {committed} of {2 * args.rounds}")
    if without and under and len(under) == args.rounds:
        ratio = statistics.median(under) / statistics.median(without)
        verdict = "PASS" if ratio <= RATIO_TARGET else "MISS"
        print(
            f"honest round time: median {statistics.median(without):.3f} s without idle streams, "
            f"{statistics.median(under):.3f} s with {args.idle_streams}: {ratio:.2f}x "
            f"(target <= {RATIO_TARGET}x) -> {verdict}"
        )
    else:
        print(
            f"honest round time: {len(under)} of {args.rounds} rounds completed their honest "
            f"uploads while the {args.idle_streams} idle streams were open -> MISS"
        )
    if released_at is not None and under_attack_unfinished(accepted, args, released_at):
        print(
            "the idle streams were released early: the federation had no honest upload for "
            f"{2 * args.deadline_s + 30:g} s with them open (the rounds after the release are "
            "shown above but not counted)"
        )
    baseline = rss_steps[0][1]
    peak = usage.ru_maxrss * 1024 / 1e6  # Linux reports KiB
    steps = ", ".join(f"{n} silos {mb:.0f} MB" for n, mb in rss_steps)
    xs = np.array([n for n, _ in rss_steps], float)
    ys = np.array([mb for _, mb in rss_steps], float)
    fitted = float(np.polyfit(xs, ys, 1)[0]) if len(set(xs)) > 1 else float("nan")
    slope = (peak - baseline) / args.silos
    verdict = "PASS" if slope <= RSS_SLOPE_TARGET_MB else "MISS"
    print(f"coordinator RSS while silos connect: {steps} (fitted slope {fitted:.2f} MB/silo)")
    print(
        f"coordinator peak RSS {peak:.0f} MB over a one-model baseline of {baseline:.0f} MB: "
        f"{slope:.2f} MB per connected silo (target <= {RSS_SLOPE_TARGET_MB:g}) -> {verdict}"
    )
    cpu = usage.ru_utime + usage.ru_stime
    print(
        f"coordinator CPU {cpu:.1f} s ({usage.ru_utime:.1f} user, {usage.ru_stime:.1f} system); exit {code}"
    )
    print("errors seen:")
    print(f"  honest silos: {dict(silo_errors) or 'none'}")
    print(f"  slow silo's calls: {slow_report.get('slow', {})}")
    print(
        f"  idle streams ended by the coordinator before release: "
        f"{attack_report.get('ended_before_release', 'n/a')}"
    )
    print(
        f"  coordinator outcomes logged: {dict(coordinator.outcomes) or 'none'}; "
        f"log lines: {dict(coordinator.levels) or 'none'}"
    )


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--worker":
        return worker_main(pathlib.Path(argv[1]), int(argv[2]), argv[3].split(","))
    if argv and argv[0] == "--attacker":
        return attacker_main(pathlib.Path(argv[1]), int(argv[2]), int(argv[3]))
    if "--secure" in argv:
        # 3 rounds of N SDK silos with secure aggregation (benchmarks/secagg_load.py).
        from benchmarks import secagg_load

        return secagg_load.main([a for a in argv if a != "--secure"])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--silos", type=int, default=100)
    parser.add_argument("--workers", type=int, default=4, help="processes the silo threads share")
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds without, then with, idle streams"
    )
    parser.add_argument("--idle-streams", type=int, default=200)
    parser.add_argument("--params", type=int, default=10_000)
    parser.add_argument("--chunk-bytes", type=int, default=8192)
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=10.0,
        help="each round's deadline; the slow silo holds every round this long",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="4 silos, 2 workers, 1+1 rounds, 8 streams"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.silos, args.workers, args.rounds, args.idle_streams = 4, 2, 1, 8
        args.params, args.deadline_s = 1_000, 3.0
    import logging

    logging.getLogger("fedpriv.pki").setLevel(logging.ERROR)  # a throwaway CA
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
