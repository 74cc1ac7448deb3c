"""This machine's ceilings, and fedpriv's hot paths as fractions of them, in one run.

Ceilings:
- numpy float32 add: ``acc += update`` over a model-sized pair of arrays, in
  update bytes per second;
- raw gRPC loopback streaming: a client stream of byte messages the size of
  fedpriv's default chunk (2 MiB), with no protobuf (identity serializers),
  into a server that only counts them, plain text and with mutual TLS, on
  grpcio's default options;
- AES-256-GCM (1 MiB messages) and the SecAgg mask PRG (AES-256-CTR keystream
  read as uint32).

fedpriv:
- fold rate: FedAvg's ``fold`` of a whole update, chunk by chunk, as in a round;
- round throughput: model bytes moved per round (down plus up, all clients)
  divided by the median round time, from benchmarks/round_bench.py's
  federation, plain text and with mTLS;
- what mTLS costs: CPU seconds per GB that TLS adds, in the raw gRPC stream and
  in a fedpriv round, beside AES-GCM's own.

    python benchmarks/limits.py              # P = 50M for the folds, 10M x 2 for rounds
    python benchmarks/limits.py --smoke      # tiny sizes, for the test suite
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import resource
import sys
import tempfile
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_app import model_arrays  # noqa: E402
from benchmarks.round_bench import cpu_s, run_one  # noqa: E402
from fedpriv.pki import CertificateAuthority, Role  # noqa: E402
from fedpriv.strategy import FedAvg  # noqa: E402
from fedpriv.wire import DEFAULT_CHUNK_BYTES, Model  # noqa: E402

MIB = 1 << 20


def best_of(repeats: int, work: callable) -> float:  # type: ignore[valid-type]
    """Smallest wall time of `repeats` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return min(times)


def cpu_seconds() -> float:
    """User plus system CPU time of this process, all threads."""
    return cpu_s(resource.getrusage(resource.RUSAGE_SELF))


def numpy_add_rate(params: int) -> float:
    acc = np.zeros(params, np.float32)
    update = np.ones(params, np.float32)
    return params * 4 / best_of(3, lambda: np.add(acc, update, out=acc))


def fold_rate(params: int) -> float:
    model = Model.from_arrays(model_arrays(params))
    update = Model.from_arrays({k: v + 1 for k, v in model.arrays().items()})
    chunks = [(offset, bytes(chunk)) for offset, chunk in update.chunks()]
    aggregator = FedAvg().begin_round(1, model=model)

    def fold_all() -> None:
        for offset, chunk in chunks:
            aggregator.fold(offset, chunk, weight=1.0)

    return update.layout.payload_bytes / best_of(3, fold_all)


def _pki(work: pathlib.Path) -> tuple[grpc.ServerCredentials, grpc.ChannelCredentials]:
    ca = CertificateAuthority.create(work, federation="limits")
    ca.issue("server", role=Role.SERVER, out_dir=work, hosts=["127.0.0.1"])
    ca.issue("client", role=Role.CLIENT, out_dir=work)
    read = lambda name: (work / name).read_bytes()  # noqa: E731
    server = grpc.ssl_server_credentials(
        [(read("server.key"), read("server.crt"))],
        root_certificates=read("ca.crt"),
        require_client_auth=True,
    )
    client = grpc.ssl_channel_credentials(
        root_certificates=read("ca.crt"),
        private_key=read("client.key"),
        certificate_chain=read("client.crt"),
    )
    return server, client


def grpc_stream_rate(total_bytes: int, *, tls: bool) -> tuple[float, float]:
    """One client-streaming call of chunk-sized messages on loopback.

    Returns (bytes per second, CPU seconds per byte). Client and server share this
    process, so its CPU time covers both ends: for mTLS, encryption and decryption.
    """

    def sink(requests, context):  # noqa: ARG001
        count = 0
        for message in requests:
            count += len(message)
        return count.to_bytes(8, "little")

    handler = grpc.method_handlers_generic_handler(
        "limits.Sink",
        {
            "Push": grpc.stream_unary_rpc_method_handler(
                sink, request_deserializer=None, response_serializer=None
            )
        },
    )
    options = [
        ("grpc.max_receive_message_length", 8 * MIB),
        ("grpc.max_send_message_length", 8 * MIB),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
    server.add_generic_rpc_handlers((handler,))
    with tempfile.TemporaryDirectory() as tmp:
        if tls:
            server_creds, client_creds = _pki(pathlib.Path(tmp))
            port = server.add_secure_port("127.0.0.1:0", server_creds)
            channel = grpc.secure_channel(f"127.0.0.1:{port}", client_creds, options=options)
        else:
            port = server.add_insecure_port("127.0.0.1:0")
            channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        server.start()
        try:
            push = channel.stream_unary("/limits.Sink/Push")
            message = os.urandom(DEFAULT_CHUNK_BYTES)
            count = max(1, total_bytes // DEFAULT_CHUNK_BYTES)

            def send() -> None:
                push(iter([message] * count), timeout=300)

            send()  # warm up the connection
            before = cpu_seconds()
            best = best_of(3, send)
            cpu = (cpu_seconds() - before) / (3 * count * DEFAULT_CHUNK_BYTES)
            return count * DEFAULT_CHUNK_BYTES / best, cpu
        finally:
            channel.close()
            server.stop(None)


def aes_gcm_rate(total_bytes: int) -> float:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    message = os.urandom(MIB)
    count = max(1, total_bytes // MIB)
    nonce = bytes(12)

    def run() -> None:
        for _ in range(count):
            aead.encrypt(nonce, message, None)

    return count * MIB / best_of(3, run)


def prg_rate(params: int) -> float:
    from fedpriv.secagg.client import MASK_SLICE
    from fedpriv.secagg.crypto import mask_elements

    buffer = bytearray(4 * MASK_SLICE + 32)
    seed = os.urandom(32)

    def run() -> None:
        for start in range(0, params, MASK_SLICE):
            mask_elements(seed, first=start, count=min(MASK_SLICE, params - start), buffer=buffer)

    return params * 4 / best_of(3, run)


@dataclass
class RoundRate:
    median_s: float
    moved_bytes: int  # model bytes per round: down plus up, all clients
    cpu_s: float  # coordinator plus silos, per round after the first (start-up excluded)

    @property
    def rate(self) -> float:
        return self.moved_bytes / self.median_s


def round_rate(params: int, clients: int, rounds: int, *, insecure: bool) -> RoundRate:
    """The median round of an R-round federation, and its CPU per round.

    A one-round federation is run too: the difference of the two runs' total CPU
    is what rounds 2..R cost, without process start-up, imports and handshakes.
    """
    runs = {}
    for count in (1, rounds):
        with tempfile.TemporaryDirectory(prefix="fedpriv-limits-") as tmp:
            runs[count] = run_one(params, clients, count, pathlib.Path(tmp), insecure=insecure)
    total = {
        count: (row.coordinator_cpu_s + row.clients_cpu_s) * count for count, row in runs.items()
    }
    return RoundRate(
        runs[rounds].median_round_s,
        2 * clients * params * 4,
        (total[rounds] - total[1]) / max(1, rounds - 1),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fold-params", type=int, default=50_000_000)
    parser.add_argument("--round-params", type=int, default=10_000_000)
    parser.add_argument("--round-clients", type=int, default=2)
    # Eight: the first two rounds allocate the buffers that later rounds reuse.
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--stream-bytes", type=int, default=512 * MIB)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes")
    args = parser.parse_args(argv)
    logging.getLogger("fedpriv.pki").setLevel(logging.ERROR)
    if args.smoke:
        args.fold_params, args.round_params, args.rounds = 100_000, 10_000, 2
        args.stream_bytes = 4 * MIB
    gb = 1e9
    add = numpy_add_rate(args.fold_params)
    fold = fold_rate(args.fold_params)
    raw_plain, raw_plain_cpu = grpc_stream_rate(args.stream_bytes, tls=False)
    raw_tls, raw_tls_cpu = grpc_stream_rate(args.stream_bytes, tls=True)
    gcm = aes_gcm_rate(min(args.stream_bytes, 256 * MIB))
    prg = prg_rate(args.fold_params)
    plain = round_rate(args.round_params, args.round_clients, args.rounds, insecure=True)
    tls = round_rate(args.round_params, args.round_clients, args.rounds, insecure=False)
    print("ceilings on this machine")
    print(f"  numpy float32 add (acc += update)        {add / gb:8.2f} GB/s")
    print(f"  raw gRPC loopback stream, plain text     {raw_plain / gb:8.2f} GB/s")
    print(f"  raw gRPC loopback stream, mutual TLS     {raw_tls / gb:8.2f} GB/s")
    print(f"  AES-256-GCM, 1 MiB messages              {gcm / gb:8.2f} GB/s")
    print(f"  SecAgg mask PRG (AES-256-CTR)            {prg / gb:8.2f} GB/s")
    print("fedpriv")
    print(
        f"  FedAvg fold, P={args.fold_params:,}        {fold / gb:8.2f} GB/s  "
        f"= {fold / add:.0%} of numpy add (target >= 50%)"
    )
    print(
        f"  round, P={args.round_params:,} x {args.round_clients}, plain text  "
        f"{plain.rate / gb:6.2f} GB/s  = {plain.rate / raw_plain:.0%} of raw gRPC plain "
        f"(median round {plain.median_s:.3f} s; target >= 50%)"
    )
    print(
        f"  round, P={args.round_params:,} x {args.round_clients}, mTLS        "
        f"{tls.rate / gb:6.2f} GB/s  = {tls.rate / raw_tls:.0%} of raw gRPC mTLS "
        f"(median round {tls.median_s:.3f} s; {tls.median_s / plain.median_s:.2f}x plain, "
        "target <= 1.15x)"
    )
    # Where mTLS's time goes: CPU seconds per GB that TLS adds (encrypting at one end and
    # decrypting at the other), in gRPC alone and in a fedpriv round.
    raw_extra = (raw_tls_cpu - raw_plain_cpu) * gb
    round_extra = (tls.cpu_s - plain.cpu_s) / plain.moved_bytes * gb
    print("CPU seconds per GB that mTLS adds (both ends together)")
    print(
        f"  raw gRPC stream                          {raw_extra:8.2f} s/GB  "
        f"({raw_plain_cpu * gb:.2f} plain, {raw_tls_cpu * gb:.2f} mTLS)"
    )
    print(
        f"  fedpriv round                            {round_extra:8.2f} s/GB  "
        f"({plain.cpu_s:.2f} s plain, {tls.cpu_s:.2f} s mTLS per round, all processes)"
    )
    print(f"  AES-256-GCM alone (encrypt + decrypt)    {2 * gb / gcm:8.2f} s/GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
