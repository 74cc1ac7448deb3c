"""An update accepted by an attempt that then fails is named as discarded in status and report.

Whatever a silo spent to release it (its DP budget for the round) bought nothing: the
global model did not change. Real gRPC over mTLS, a real SQLite store, the CLI's report.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedpriv.cli.main import main
from fedpriv.cli.status import format_status, query_status
from fedpriv.client.config import ClientConfig
from fedpriv.coordinator import Coordinator, Store
from fedpriv.coordinator.phases import Outcome
from fedpriv.coordinator.privacy_record import DiscardedUpdate
from tests.conftest import ArrayClient
from tests.helpers import make_config, silo_thread, wait_silos

ARRAYS = {"w": np.zeros(16, np.float32)}


class NaNFirst(ArrayClient):
    """Sends a non-finite update at its first fit (rejected), then honest ones.

    The bad update leaves only once the coordinator has accepted `first`'s update of
    the same attempt (its condition variable is notified at every outcome), so the
    attempt fails with one accepted update, whatever the threads' timing.
    """

    def __init__(self, federation=None, first: str = "silo-a") -> None:
        super().__init__()
        self.federation, self.first = federation, first

    def fit(self, parameters, *, config):
        result = super().fit(parameters, config=config)
        if self.fits == 1:
            fed = self.federation
            with fed.cond:
                assert fed.cond.wait_for(
                    lambda: (
                        fed.phase is not None
                        and fed.phase.outcomes.get(self.first) is Outcome.ACCEPTED
                    ),
                    timeout=60,
                ), "the other silo's update was never accepted"
            return dataclasses.replace(
                result,
                parameters={k: np.full_like(v, np.nan) for k, v in result.parameters.items()},
            )
        return result


def test_a_failed_attempts_accepted_update_is_named_in_status_and_report(tmp_path, pki, capsys):
    # Arrange: both silos needed; silo-b's first update is rejected, so attempt 1 fails
    # with silo-a's update accepted, and the retry completes with both.
    config = make_config(
        tmp_path, pki.root, ARRAYS, num_rounds=1, min_clients=2, federated_evaluation=False
    )
    config = dataclasses.replace(config, operators=frozenset({"operator"}))
    # Act
    with Coordinator(config) as coordinator:
        with (
            silo_thread(ArrayClient(), port=coordinator.port, tls=pki.tls("silo-a")) as a,
            silo_thread(
                NaNFirst(coordinator.federation), port=coordinator.port, tls=pki.tls("silo-b")
            ) as b,
        ):
            assert coordinator.wait(timeout_s=120)
            wait_silos([a, b])
            operator = ClientConfig(
                coordinator=f"127.0.0.1:{coordinator.port}",
                ca=pki.root / "ca.crt",
                cert=pki.root / "operator.crt",
                key=pki.root / "operator.key",
            )
            status = query_status(operator, insecure=False, identity=None, timeout_s=10)
    # Assert: exactly silo-a's update of the failed attempt, not the retry's
    store = Store(config.state_dir)
    discarded = store.discarded_updates()
    assert store.rounds() == [0, 1]
    store.close()
    assert [(d.round, d.silo) for d in discarded] == [(1, "silo-a")]
    assert discarded[0] == DiscardedUpdate(round=1, silo="silo-a", reason=discarded[0].reason)
    assert "1 of 2 updates accepted, 2 needed (rejected=1" in discarded[0].reason
    assert status["discarded_updates"] == [
        {"round": 1, "silo": "silo-a", "reason": discarded[0].reason}
    ]
    shown = format_status(status)
    assert "discarded updates (their attempt failed; DP budget spent on them bought nothing):" in (
        shown
    )
    assert "  round 1: silo-a (the attempt failed: 1 of 2 updates accepted" in shown
    # fedpriv report, on the state folder, says the same
    assert main(["report", str(config.state_dir)]) == 0
    printed = capsys.readouterr().out
    assert "  round 1: silo-a (the attempt failed: 1 of 2 updates accepted" in printed


def test_a_federation_without_failed_attempts_lists_none(tmp_path, pki, capsys):
    config = make_config(tmp_path, pki.root, ARRAYS, num_rounds=1, federated_evaluation=False)
    with Coordinator(config) as coordinator:
        with (
            silo_thread(ArrayClient(), port=coordinator.port, tls=pki.tls("silo-a")) as a,
            silo_thread(ArrayClient(), port=coordinator.port, tls=pki.tls("silo-b")) as b,
        ):
            assert coordinator.wait(timeout_s=120)
            wait_silos([a, b])
    store = Store(config.state_dir)
    assert store.discarded_updates() == []
    store.close()
    assert main(["report", str(config.state_dir)]) == 0
    assert "discarded" not in capsys.readouterr().out
