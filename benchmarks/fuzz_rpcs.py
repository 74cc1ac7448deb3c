"""A longer fuzz run against a live coordinator: inputs per second and every finding.

The same federation and mutations as tests/fuzz (a real coordinator over mTLS in
this process, two honest silos, three raw fuzzing silos, an operator, a silo off
the allow list and a certificate of another CA), driven by hypothesis in random
batches until the time is up. A finding is an answer outside the RPC's allowed
set (INTERNAL, UNKNOWN, ...), a hang (no answer within the call timeout), a
replay that was taken, or a served model that is not the exact FedAvg of the
accepted uploads. Each is printed with the input that caused it.

    python benchmarks/fuzz_rpcs.py --duration 600     # ten minutes
    python benchmarks/fuzz_rpcs.py --smoke            # a few seconds, for the test suite

Exit status 1 when there were findings.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fedpriv.pki import CertificateAuthority, Role  # noqa: E402
from fedpriv.transport import TLSConfig  # noqa: E402
from tests.fuzz.drivers import (  # noqa: E402
    CALLERS,
    REPLAY_OPS,
    RPCS,
    fuzz_replay,
    fuzz_request,
    fuzz_stream,
)
from tests.fuzz.harness import FUZZERS, HONEST, OPERATOR, OUTSIDER, FuzzFleet  # noqa: E402
from tests.fuzz.mutations import plans  # noqa: E402

BATCH = 50  # examples per hypothesis run; the clock is read between runs


@dataclasses.dataclass(frozen=True)
class BenchPki:
    """The certificates tests/conftest.py's `pki` fixture makes, in a folder of our own."""

    root: pathlib.Path
    foreign: pathlib.Path

    @classmethod
    def create(cls, work: pathlib.Path) -> BenchPki:
        root, foreign = work / "pki", work / "foreign"
        ca = CertificateAuthority.create(root, federation="fuzzfed")
        ca.issue("coordinator", role=Role.SERVER, out_dir=root, hosts=["127.0.0.1", "localhost"])
        for name in (*HONEST, *FUZZERS, OPERATOR, OUTSIDER):
            ca.issue(name, role=Role.CLIENT, out_dir=root)
        other = CertificateAuthority.create(foreign, federation="otherfed")
        other.issue("silo-a", role=Role.CLIENT, out_dir=foreign)
        return cls(root=root, foreign=foreign)

    def tls(self, name: str, *, foreign: bool = False) -> TLSConfig:
        base = self.foreign if foreign else self.root
        if foreign:
            # Built as is, past from_files' own checks (which refuse a certificate of
            # another CA before connecting): the coordinator must refuse it too.
            return TLSConfig(
                ca_pem=(self.root / "ca.crt").read_bytes(),
                cert_pem=(base / f"{name}.crt").read_bytes(),
                key_pem=(base / f"{name}.key").read_bytes(),
            )
        return TLSConfig.from_files(
            ca=self.root / "ca.crt", cert=base / f"{name}.crt", key=base / f"{name}.key"
        )


# Random, unlike the CI profile: every batch tries new inputs.
BATCH_SETTINGS = settings(
    max_examples=BATCH,
    deadline=None,
    database=None,
    derandomize=False,
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


def run(duration_s: float) -> int:
    with tempfile.TemporaryDirectory(prefix="fedpriv-fuzz-") as tmp:
        work = pathlib.Path(tmp)
        with FuzzFleet(work / "fleet", BenchPki.create(work)) as fleet:

            @BATCH_SETTINGS
            @given(plan=plans())
            def streams(plan):
                fuzz_stream(fleet, plan)

            @BATCH_SETTINGS
            @given(rpc=st.sampled_from(RPCS), caller=st.sampled_from(CALLERS), plan=plans())
            def requests(rpc, caller, plan):
                fuzz_request(fleet, rpc, caller, plan)

            @BATCH_SETTINGS
            @given(plan=plans(ops=REPLAY_OPS))
            def replays(plan):
                fuzz_replay(fleet, plan)

            started = time.perf_counter()
            end = started + duration_s
            batches = 0
            model_errors: list[str] = []
            while time.perf_counter() < end:
                # Streams twice as often: they reach deepest.
                batch = (streams, streams, requests, replays)[batches % 4]
                try:
                    batch()
                except AssertionError as err:  # the exact model check (or a valid call) failed
                    model_errors.append(str(err).splitlines()[0])
                    break
                batches += 1
                if batches % 8 == 0:
                    elapsed = time.perf_counter() - started
                    tried = sum(fleet.inputs.values())
                    print(
                        f"# {elapsed:6.0f} s  {tried:7d} inputs  {tried / elapsed:6.1f}/s  "
                        f"findings={len(fleet.findings)}",
                        file=sys.stderr,
                    )
            elapsed = time.perf_counter() - started
            committed = fleet.check_committed() if not model_errors else -1
            tried = sum(fleet.inputs.values())
            print(f"fuzzed {elapsed:.0f} s: {tried} inputs, {tried / elapsed:.1f} inputs/s")
            print(f"by RPC: {dict(sorted(fleet.inputs.items()))}")
            print("status codes seen:")
            for (rpc, code), count in sorted(fleet.codes.items()):
                print(f"  {rpc:<11} {code:<20} {count:7d}")
            print(
                f"rounds checked exactly: {fleet.rounds_checked} served models, last committed "
                f"round {committed}; fuzzing uploads accepted: {fleet.accepted_fuzz}"
            )
            findings = [str(f) for f in fleet.findings] + [f"model: {e}" for e in model_errors]
            print(f"findings: {len(findings)}")
            for finding in findings[:50]:
                print("  " + finding)
            if len(findings) > 50:
                print(f"  ... and {len(findings) - 50} more")
            return 1 if findings else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds (default 120)")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for the test suite")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)  # findings are printed, not logged
    return run(5.0 if args.smoke else args.duration)


if __name__ == "__main__":
    sys.exit(main())
