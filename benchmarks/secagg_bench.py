"""Secure aggregation against plain aggregation, with real processes over mTLS.

For each (P, N) it runs the same federation twice, plain FedAvg and with
secure_aggregation = true, and prints the silos' masking time (clip, quantise,
round, then pairwise and self masks), the coordinator's unmasking time, and the
round times with their ratio. "silo alone" is one silo's encode and mask time
measured in this process with nothing else running: here all N silos share
this machine's cores, so their encode and mask times in the table include
waiting for each other, which silos in their own datacentres would not. Masking and unmasking times come from the
processes' own logs; round time is the coordinator's, from its SQLite store.

    python benchmarks/secagg_bench.py                 # N in {4, 8, 16}, P in {1M, 10M}
    python benchmarks/secagg_bench.py --smoke         # tiny sizes, for the test suite
    python benchmarks/secagg_bench.py --graph-only    # the SecAgg+ keystream table only
    python benchmarks/secagg_bench.py --floors-only   # work alone against its floor
    python benchmarks/secagg_bench.py --large         # N = 32, 64, 100 at P = 1M

The first table gives, for N = 8 … 100 silos, the SecAgg+ graph the
coordinator's default ``[secagg]`` settings plan (degree k, threshold t,
dropouts tolerated and both failure bounds) and each silo's keystream bytes per
round at 1M parameters (k + 1 masks of 4 bytes per parameter), next to the
complete graph's N masks.

``--large`` runs 3 rounds at N = 32, 64 and 100 silos with P = 1M through
``benchmarks/secagg_load.py``: the silos are the SDK's ``run_client`` as
threads in 4 worker processes (not one process each: 100 silo processes with
their own interpreters would not fit beside each other on the reference
machine's 2 cores), and each row gives k, t, keystream bytes per silo, round
time, encode + mask, unmask and the coordinator's peak RSS.

The floor table (``--floors-only``, P = 10M, N = 8) times one silo's fused
encode + mask and the coordinator's mask removal (8 survivors' self masks and
one dropped silo's pairwise masks), each the median of 5, beside its floor
measured in the same run, in the same slices and threads. The silo's floor is
what any implementation must do: quantise (subtract two float32 tensors, scale,
round to nearest, write int32), expand the AES-256-CTR keystreams of its masks
and of the rounding's random words, and add the masks mod 2^32; the keystreams
alone are shown beside it. The coordinator's floor is the keystream alone of
the masks it removes.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.round_bench import parse_sizes, run_one  # noqa: E402
from fedpriv.secagg.fused import threads_available  # noqa: E402

TARGET_RATIO = 1.5
SECURE = "secure_aggregation = true\n[secagg]\nclip_norm = 100.0\n"


@dataclass
class Row:
    params: int
    clients: int
    plain_round_s: float
    secure_round_s: float
    encode_mask_s: float
    unmask_s: float
    alone_s: float

    @property
    def ratio(self) -> float:
        return self.secure_round_s / self.plain_round_s


def _median_from_logs(paths: list[pathlib.Path], key: str) -> float:
    values = [
        float(m.group(1))
        for path in paths
        for m in re.finditer(rf"{key}=([0-9.]+)", path.read_text())
    ]
    return statistics.median(values) if values else float("nan")


def _keystream_s(masks: int, params: int, threads: int, *, silo: bool) -> float:
    """AES-256-CTR keystream for `masks` masks of `params` uint32, in the slices
    and threads of the silo's fused pass (`silo`) or of mask removal, with
    nothing else done."""
    from fedpriv.secagg.fused import slice_elements

    width = slice_elements(threads, floats=silo)
    return _floor_s(masks, params, threads, quantise=False, width=width)


def _floor_s(
    masks: int, params: int, threads: int, *, quantise: bool = True, width: int | None = None
) -> float:
    """The silo's floor: per slice, quantise (the difference of two float32 tensors,
    scaled, rounded to nearest, written as int32), one keystream of random words
    for rounding, and each mask's keystream added into the slice mod 2^32. Without
    `quantise`: the keystreams alone."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from fedpriv.secagg.fused import slice_elements

    width = width or slice_elements(threads)
    share = [params // threads + (part < params % threads) for part in range(threads)]
    new = [np.full(n, 1e-3, np.float32) for n in share]
    old = [np.zeros(n, np.float32) for n in share]
    out = [np.full(n, 7, np.uint32) for n in share]  # touched: no page faults timed

    def expand(part: int) -> None:
        zeros = memoryview(bytes(4 * width))
        buffer = bytearray(4 * width + 16)
        words = np.frombuffer(buffer, np.uint32, count=width)
        d = np.empty(width, np.float32)
        v = np.empty(width, np.float64)
        streams = [
            Cipher(algorithms.AES(bytes([k]) * 32), modes.CTR(bytes(16))).encryptor()
            for k in range(masks)
        ]
        for start in range(0, share[part], width):
            n = min(width, share[part] - start)
            target = out[part][start : start + n]
            if quantise:
                np.subtract(new[part][start : start + n], old[part][start : start + n], out=d[:n])
                np.multiply(d[:n], 1e4, out=v[:n])
                np.rint(v[:n], out=v[:n])
                np.copyto(target.view(np.int32), v[:n], casting="unsafe")
            for k, encryptor in enumerate(streams):
                encryptor.update_into(zeros[: 4 * n], buffer)
                if quantise and k:  # stream 0 stands for rounding's random words
                    np.add(target, words[:n], out=target)

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(expand, range(threads)))
    return time.perf_counter() - started


@dataclass
class Floors:
    masks: int
    silo_s: float
    silo_floor_s: float
    silo_keystream_s: float
    unmask_masks: int
    unmask_s: float
    unmask_floor_s: float

    @property
    def silo_ratio(self) -> float:
        return self.silo_s / self.silo_floor_s

    @property
    def unmask_ratio(self) -> float:
        return self.unmask_s / self.unmask_floor_s


def silo_work_alone(
    params: int, clients: int, *, threads: int = 1, dropped: int = 1, repeats: int = 5
) -> Floors:
    """One silo's encode + mask and the coordinator's mask removal, each beside its floor.

    Measured in this process with nothing else running, each the median of
    `repeats`. The silo's floor is what any implementation does (see
    :func:`_floor_s`): quantise, expand its masks' keystreams and the rounding's
    random words, add the masks mod 2^32; its keystream alone is reported too. The
    coordinator's floor is the keystream alone of the masks it removes (every
    survivor's self mask and the dropped silo's pairwise masks).
    """
    import numpy as np

    from fedpriv.coordinator import SecAggConfig
    from fedpriv.privacy.central import secure_generator
    from fedpriv.secagg import ClientSession, RingCodec
    from fedpriv.secagg.fused import apply_masks, encode_masked

    plan = SecAggConfig().graph_for(clients)
    # A silo masks with its k neighbours (all others in the complete graph): the same
    # masks as a complete round of k + 1 silos.
    group = plan.degree + 1
    threshold = group // 2 + 1
    sessions = [
        ClientSession(silo=f"silo-{k}", session="bench", round=1, threshold=threshold)
        for k in range(group)
    ]
    keys = {s.silo: s.advertise() for s in sessions}
    for s in sessions:
        s.set_peers(keys)
    outgoing = {s.silo: s.share() for s in sessions}
    sessions[0].receive(
        {sender: out["silo-0"] for sender, out in outgoing.items() if sender != "silo-0"}
    )
    codec = RingCodec.plan(
        clip_norm=100.0, size=params, clients=clients, threshold=plan.min_survivors
    )
    new = np.random.default_rng(0).normal(0, 1e-3, params).astype(np.float32)
    old = np.zeros_like(new)
    out = np.empty(params, np.uint32)
    seeds = sessions[0].mask_seeds()
    encode_masked(
        codec, [new], [old], seeds, out, generator=secure_generator, threads=threads
    )  # warm: pages, caches

    def timed(work: Any) -> float:
        took = []
        for _ in range(repeats):
            started = time.perf_counter()
            work()
            took.append(time.perf_counter() - started)
        return statistics.median(took)

    count = clients - dropped + dropped * plan.degree
    removed = [(k.to_bytes(32, "big"), bool(k % 2)) for k in range(count)]
    streams = len(seeds) + 1  # the masks and the rounding's random words
    return Floors(
        masks=len(seeds),
        silo_s=timed(
            lambda: encode_masked(
                codec, [new], [old], seeds, out, generator=secure_generator, threads=threads
            )
        ),
        silo_floor_s=statistics.median(_floor_s(streams, params, threads) for _ in range(repeats)),
        silo_keystream_s=statistics.median(
            _keystream_s(streams, params, threads, silo=True) for _ in range(repeats)
        ),
        unmask_masks=len(removed),
        unmask_s=timed(lambda: apply_masks(out, removed, sign=-1, threads=threads)),
        unmask_floor_s=statistics.median(
            _keystream_s(len(removed), params, threads, silo=False) for _ in range(repeats)
        ),
    )


def measure(params: int, clients: int, rounds: int) -> Row:
    with tempfile.TemporaryDirectory(prefix="fedpriv-secagg-") as tmp:
        plain = run_one(params, clients, rounds, pathlib.Path(tmp))
    with tempfile.TemporaryDirectory(prefix="fedpriv-secagg-") as tmp:
        work = pathlib.Path(tmp)
        secure = run_one(params, clients, rounds, work, extra_config=SECURE)
        silo_logs = [work / f"silo-{k}.log" for k in range(clients)]
        return Row(
            params=params,
            clients=clients,
            plain_round_s=plain.median_round_s,
            secure_round_s=secure.median_round_s,
            encode_mask_s=_median_from_logs(silo_logs, "encode_mask_s"),
            unmask_s=_median_from_logs([work / "coordinator.log"], "unmask_s"),
            alone_s=silo_work_alone(params, clients).silo_s,
        )


def print_graph_table(params: int = 1_000_000) -> None:
    """k, t and keystream bytes per silo per round under the default settings, by N."""
    from fedpriv.coordinator import SecAggConfig

    config = SecAggConfig()
    print(
        f"SecAgg+ graphs at P={params:,} ([secagg] defaults: dropout={config.dropout}, "
        f"corrupt_fraction={config.corrupt_fraction}, sigma={config.security_bits}, "
        f"eta={config.correctness_bits}; planned graph = 'auto')"
    )
    print(
        f"{'silos':>6} {'graph':>8} {'k':>4} {'t':>4} {'drops ok':>8} {'p_security':>10} "
        f"{'p_correct':>10} {'keystream MB':>12} {'complete MB':>11} {'saving':>7}"
    )
    for n in (8, 16, 32, 64, 100):
        plan = config.graph_for(n)
        sparse = SecAggConfig(graph="harary").graph_for(n)
        chosen = "complete" if plan.complete else "harary"
        mine = 4 * params * plan.masks_per_silo / 1e6
        full = 4 * params * n / 1e6
        print(
            f"{n:>6} {chosen:>8} {plan.degree:>4} {plan.threshold:>4} {plan.dropped:>8} "
            f"{plan.security:>10.1e} {plan.correctness:>10.1e} {mine:>12.0f} {full:>11.0f} "
            f"{full / mine:>6.1f}x"
        )
        if plan.complete and not sparse.complete:
            print(
                f"{'':>6} {'(harary)':>8} {sparse.degree:>4} {sparse.threshold:>4} "
                f"{sparse.dropped:>8} {sparse.security:>10.1e} {sparse.correctness:>10.1e} "
                f"{4 * params * sparse.masks_per_silo / 1e6:>12.0f}"
            )


def print_floor_table(params: int, clients: int, threads: int) -> None:
    """Silo encode + mask and coordinator mask removal against their floors."""
    f = silo_work_alone(params, clients, threads=threads)
    print(
        f"work alone at P={params:,}, N={clients} ({threads} thread(s), nothing else running, "
        "median of 5)"
    )
    print(
        f"{'part':>22} {'masks':>6} {'time s':>8} {'floor s':>8} {'ratio':>6} {'target':>7} "
        f"{'keystream s':>11} {'ratio':>6}"
    )
    for name, masks, took, floor, keystream in (
        ("silo encode + mask", f.masks, f.silo_s, f.silo_floor_s, f.silo_keystream_s),
        ("coord mask removal", f.unmask_masks, f.unmask_s, f.unmask_floor_s, f.unmask_floor_s),
    ):
        ratio = took / floor
        verdict = "PASS" if ratio <= TARGET_RATIO else "MISS"
        print(
            f"{name:>22} {masks:>6} {took:>8.3f} {floor:>8.3f} {ratio:>5.2f}x "
            f"{verdict:>4} {TARGET_RATIO}x {keystream:>11.3f} {took / keystream:>5.2f}x"
        )


def print_table(rows: list[Row]) -> None:
    print(
        f"{'params':>10} {'clients':>7} {'silo encode+mask s':>18} "
        f"{'silo alone s':>12} {'coord unmask s':>14} {'plain round s':>13} "
        f"{'secagg round s':>14} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r.params:>10,} {r.clients:>7} {r.encode_mask_s:>18.3f} "
            f"{r.alone_s:>12.3f} {r.unmask_s:>14.3f} {r.plain_round_s:>13.3f} {r.secure_round_s:>14.3f} "
            f"{r.ratio:>5.2f}x"
        )
    for r in rows:
        if r.params == 10_000_000 and r.clients == 8:
            verdict = (
                "PASS" if r.ratio <= TARGET_RATIO else f"MISS by {r.ratio / TARGET_RATIO:.2f}x"
            )
            print(
                f"target: secure round <= {TARGET_RATIO}x plain at P=10,000,000, N=8: "
                f"{r.ratio:.2f}x -> {verdict}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph-only", action="store_true", help="print the graph table only")
    parser.add_argument("--floors-only", action="store_true", help="print the floor table only")
    parser.add_argument(
        "--large",
        action="store_true",
        help="rows at N = 32, 64, 100 (P = 1M, SDK silos as threads) only",
    )
    args = parse_sizes(
        parser, argv, params=(1_000_000, 10_000_000), clients=(4, 8, 16), smoke_clients=3
    )
    print_graph_table()
    if args.graph_only:
        return 0
    if args.large:
        from benchmarks import secagg_load

        results = [secagg_load.run(n, 1_000_000, 3, 4) for n in (32, 64, 100)]
        secagg_load.print_results(results, 4)
        return 0
    if args.floors_only:
        for threads in sorted({1, threads_available()}):
            print_floor_table(10_000_000, 8, threads)
        return 0
    rows = []
    for params in args.params:
        for clients in args.clients:
            started = time.monotonic()
            rows.append(measure(params, clients, args.rounds))
            print(
                f"# P={params:,} N={clients} done in {time.monotonic() - started:.0f} s",
                file=sys.stderr,
            )
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
