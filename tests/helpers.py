"""Helpers shared by integration tests: a coordinator in a thread, silos in threads."""

from __future__ import annotations

import contextlib
import os
import pathlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest

from fedpriv.client import ClientStats, run_client
from fedpriv.coordinator import (
    Coordinator,
    CoordinatorConfig,
    ModelSource,
    RoundConfig,
    RoundSummary,
    TLSFiles,
    write_checkpoint,
)
from fedpriv.privacy.central import CentralDP
from fedpriv.transport import TLSConfig
from fedpriv.wire import Model


def require_privilege(missing: str | None) -> None:
    """Go on if nothing is `missing`; otherwise skip with the reason, or fail under CI.

    For tests that need root, mount(8) or network namespaces. On a developer's
    machine without them the test is skipped and says why; under ``CI=true``
    (set by ``.ci/run``, which runs as root and installs the tools) the same
    test fails, so a CI machine that lost a privilege cannot stay green.
    """
    if missing is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{missing}; CI must run this test (as root, with the tools .ci/run installs)")
    pytest.skip(missing)


class CollectingReporter:
    def __init__(self) -> None:
        self.completed: list[RoundSummary] = []
        self.failed: list[tuple[int, str]] = []

    def round_completed(self, summary: RoundSummary) -> None:
        self.completed.append(summary)

    def round_failed(self, round: int, reason: str) -> None:
        self.failed.append((round, reason))


def make_config(
    tmp: pathlib.Path,
    pki_root: pathlib.Path | None,
    arrays: Mapping[str, np.ndarray],
    *,
    allowed: tuple[str, ...] | None = None,
    chunk_bytes: int = 1 << 20,
    dp: CentralDP | None = None,
    **rounds: Any,
) -> CoordinatorConfig:
    checkpoint = tmp / "initial.fpck"
    write_checkpoint(checkpoint, Model.from_arrays(arrays, chunk_bytes=chunk_bytes))
    tls = None
    if pki_root is not None:
        tls = TLSFiles(
            ca=pki_root / "ca.crt",
            cert=pki_root / "coordinator.crt",
            key=pki_root / "coordinator.key",
        )
    # No wait between attempts at a failed round: the tests that retry run at once.
    settings = {
        "num_rounds": 1,
        "min_clients": 2,
        "deadline_s": 60.0,
        "retry_backoff_s": 0.0,
        **rounds,
    }
    return CoordinatorConfig(
        address="127.0.0.1:0",
        tls=tls,
        allowed_silos=None if allowed is None else frozenset(allowed),
        rounds=RoundConfig(**settings),
        model=ModelSource(checkpoint=checkpoint),
        state_dir=tmp / "state",
        heartbeat_interval_s=1,
        poll_wait_s=2,
        dp=dp,
    )


@contextlib.contextmanager
def silo_thread(
    client: Any,
    *,
    port: int | None,
    tls: TLSConfig | None,
    insecure: bool = False,
    identity: str | None = None,
    reconnect_timeout_s: float = 30.0,
    address: str | None = None,
    server_name: str | None = None,
    ledger: Any = None,
    limits: Any = None,
) -> Iterator[dict[str, Any]]:
    """Run a silo in a thread; the yielded dict gets 'stats' or 'error' when it ends.

    It connects to 127.0.0.1:`port`, or to `address` (a Unix socket, say) when given.
    With a `ledger` (an open PrivacyLedger) the silo accounts and reports its epsilon.
    """
    outcome: dict[str, Any] = {}
    stop = threading.Event()

    def target() -> None:
        try:
            outcome["stats"] = run_client(
                client,
                coordinator=address or f"127.0.0.1:{port}",
                server_name=server_name,
                tls=tls,
                insecure=insecure,
                identity=identity,
                poll_wait_s=2,
                reconnect_timeout_s=reconnect_timeout_s,
                stop=stop,
                ledger=ledger,
                limits=limits,
            )
        except Exception as err:  # recorded for the test to assert on
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    outcome["thread"] = thread
    try:
        yield outcome
    finally:
        stop.set()
        thread.join(30)


def wait_silos(outcomes: list[dict[str, Any]], timeout_s: float = 60) -> list[ClientStats]:
    for outcome in outcomes:
        outcome["thread"].join(timeout_s)
    return [o.get("stats") for o in outcomes]


def run_three_silos(
    config: CoordinatorConfig,
    pki: Any,
    clients: list[Any],
    silos: tuple[str, str, str],
    *,
    before_stop: Any = None,
) -> tuple[CollectingReporter, Any]:
    """A coordinator and three silo threads over mTLS, until the federation finishes.

    `before_stop(coordinator)` runs once the silos are done, before the
    coordinator stops; its result is returned beside the reporter.
    """
    reporter = CollectingReporter()
    with Coordinator(config, reporter=reporter) as coordinator:
        with (
            silo_thread(clients[0], port=coordinator.port, tls=pki.tls(silos[0])) as a,
            silo_thread(clients[1], port=coordinator.port, tls=pki.tls(silos[1])) as b,
            silo_thread(clients[2], port=coordinator.port, tls=pki.tls(silos[2])) as c,
        ):
            assert coordinator.wait(timeout_s=120)
            wait_silos([a, b, c])
        after = before_stop(coordinator) if before_stop is not None else None
    return reporter, after
