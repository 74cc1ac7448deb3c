"""Adversarial silos and a lying relay in a real secure-aggregation round (gRPC, mTLS).

A silo that advertises an all-zero key, a silo that tampers with a share
ciphertext and a coordinator that relays an inconsistent roster each leave every
honest silo running. The round completes with the honest silos when enough of
them remain, or fails with no model published.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from fedpriv.coordinator import Coordinator, SecAggConfig, Store, read_checkpoint
from fedpriv.errors import RoundFailed
from fedpriv.secagg import ClientSession, ServerSession, crypto
from fedpriv.transport import open_channel
from fedpriv.v1 import fleet_pb2, fleet_pb2_grpc
from tests.apps import RandomUpdateClient, random_update
from tests.conftest import SILOS
from tests.helpers import CollectingReporter, make_config, silo_thread

SHAPES = {"w": (40, 10), "b": (10,)}


def secure_config(tmp_path, *, pki, threshold=3):
    config = make_config(
        tmp_path,
        pki.root,
        {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()},
        min_clients=5,
        max_clients=5,
        num_rounds=1,
        federated_evaluation=False,
        min_results=threshold,
        max_failed_attempts=1,
        chunk_bytes=1 << 10,
    )
    return dataclasses.replace(
        config, secure_aggregation=SecAggConfig(threshold=threshold, unmask_deadline_s=15)
    )


@contextlib.contextmanager
def honest_silos(port: int, pki, names) -> Iterator[list[dict[str, Any]]]:
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(
                silo_thread(RandomUpdateClient(SILOS.index(name)), port=port, tls=pki.tls(name))
            )
            for name in names
        ]


def assert_running_and_clean(outcomes: list[dict[str, Any]]) -> None:
    """Every silo thread is alive (still polling for tasks) and none ended with an error."""
    for outcome in outcomes:
        assert "error" not in outcome, outcome.get("error")
        assert outcome["thread"].is_alive()


def assert_finished_cleanly(outcomes: list[dict[str, Any]]) -> None:
    """Every silo thread trained once and returned normally when told the federation finished."""
    for outcome in outcomes:
        assert "error" not in outcome, outcome.get("error")
        assert outcome["stats"].trained == 1


def committed_model(config) -> dict[str, np.ndarray] | None:
    store = Store(config.state_dir)
    committed = store.last_committed()
    store.close()
    if committed is None or committed.round < 1:
        return None
    return read_checkpoint(committed.checkpoint).arrays()


def participants(config) -> dict[str, tuple[str, str]]:
    store = Store(config.state_dir)
    rows = store.participants(1)
    store.close()
    return {silo: (outcome, detail) for task, silo, outcome, detail in rows if task == "train"}


def assert_mean_of(final: dict[str, np.ndarray], names) -> None:
    updates = [random_update(SILOS.index(name), SHAPES) for name in names]
    for key in SHAPES:
        np.testing.assert_allclose(
            final[key], np.mean([u[key] for u in updates], axis=0), atol=1e-6
        )


def assert_no_checkpoint(config) -> None:
    assert committed_model(config) is None
    assert not list((config.state_dir / "checkpoints").glob("round-000001*"))


def test_a_silo_advertising_the_all_zero_key_is_refused_and_the_round_completes_without_it(
    tmp_path, pki
):
    # Arrange: silo-e is driven by hand and advertises the all-zero (low-order) key
    config = secure_config(tmp_path, pki=pki)
    reporter = CollectingReporter()
    with (
        Coordinator(config, reporter=reporter) as coordinator,
        honest_silos(coordinator.port, pki, SILOS[:4]) as outcomes,
    ):
        channel = open_channel(f"127.0.0.1:{coordinator.port}", tls=pki.tls("silo-e"))
        stub = fleet_pb2_grpc.FleetStub(channel)
        stub.Join(fleet_pb2.JoinRequest(sdk_version="test"), timeout=10)
        task = None
        while task is None:
            first = next(iter(stub.PullTask(fleet_pb2.PullTaskRequest(wait_s=2), timeout=30)))
            if first.task.kind == fleet_pb2.TASK_KIND_TRAIN:
                task = first.task
        keys = fleet_pb2.AdvertiseKeys(
            cipher_public_key=bytes(32), mask_public_key=crypto.KeyPair().public_bytes
        )
        # Act
        with pytest.raises(grpc.RpcError) as refused:
            stub.SecAgg(
                fleet_pb2.SecAggRequest(task_id=task.task_id, round=1, advertise=keys), timeout=30
            )
        stub.Leave(fleet_pb2.LeaveRequest(reason="refused"), timeout=10)
        channel.close()
        assert coordinator.wait(timeout_s=120)
    assert_finished_cleanly(outcomes)
    # Assert: refused at the coordinator, the four honest silos' mean is committed
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "small order" in refused.value.details()
    assert_mean_of(committed_model(config), SILOS[:4])
    outcomes_by_silo = participants(config)
    assert outcomes_by_silo["silo-e"][0] == "rejected"
    assert "public key" in outcomes_by_silo["silo-e"][1]
    assert all(outcomes_by_silo[name][0] == "accepted" for name in SILOS[:4])


def test_a_relay_that_hands_out_an_all_zero_key_fails_the_round_safely(tmp_path, pki, monkeypatch):
    # Arrange: the coordinator replaces silo-e's cipher key with zeros in what it relays
    original = ServerSession.advertise

    def lying_advertise(self, silo, task_id, *, cipher_key, mask_key):
        peers = original(self, silo, task_id, cipher_key=cipher_key, mask_key=mask_key)
        peers["silo-e"] = (bytes(32), peers["silo-e"][1])
        return peers

    monkeypatch.setattr(ServerSession, "advertise", lying_advertise)
    config = secure_config(tmp_path, pki=pki)
    # Act
    with (
        Coordinator(config) as coordinator,
        honest_silos(coordinator.port, pki, SILOS) as outcomes,
    ):
        with pytest.raises(RoundFailed):
            coordinator.wait(timeout_s=120)
        # Assert: every honest silo is still serving, and nothing was published
        assert_running_and_clean(outcomes)
    assert_no_checkpoint(config)
    reasons = " ".join(detail for _, detail in participants(config).values())
    assert "silo-e" in reasons


def tamper_shares(monkeypatch, *, sender: str, victims: set[str]) -> None:
    """Make `sender` flip one byte of the share ciphertexts it addresses to `victims`."""
    original = ClientSession.share

    def share(self):
        out = original(self)
        if self.silo == sender:
            for victim in victims & set(out):
                sealed = bytearray(out[victim])
                sealed[-1] ^= 0x01
                out[victim] = bytes(sealed)
        return out

    monkeypatch.setattr(ClientSession, "share", share)


def test_a_tampered_share_is_reported_and_the_round_completes_from_the_other_shares(
    tmp_path, pki, monkeypatch, caplog
):
    # Arrange: silo-e tampers with the share it sends silo-a
    tamper_shares(monkeypatch, sender="silo-e", victims={"silo-a"})
    config = secure_config(tmp_path, pki=pki)
    caplog.set_level("WARNING")
    # Act
    with (
        Coordinator(config) as coordinator,
        honest_silos(coordinator.port, pki, SILOS) as outcomes,
    ):
        assert coordinator.wait(timeout_s=120)
    assert_finished_cleanly(outcomes)
    # Assert: t other shares of silo-e's seed unmask the sum exactly
    assert_mean_of(committed_model(config), SILOS)
    reported = [
        r.getMessage()
        for r in caplog.records
        if "silo=silo-a" in r.getMessage() and "invalid_share_from=silo-e" in r.getMessage()
    ]
    assert reported, [r.getMessage() for r in caplog.records]


def test_a_silo_tampering_with_every_share_fails_the_round_safely(tmp_path, pki, monkeypatch):
    # Arrange: silo-e tampers with every share it sends: no silo can reveal its seed
    tamper_shares(monkeypatch, sender="silo-e", victims=set(SILOS))
    config = secure_config(tmp_path, pki=pki)
    # Act
    with (
        Coordinator(config) as coordinator,
        honest_silos(coordinator.port, pki, SILOS) as outcomes,
    ):
        with pytest.raises(RoundFailed) as failed:
            coordinator.wait(timeout_s=120)
        assert_running_and_clean(outcomes)
    # Assert
    assert "silo-e" in str(failed.value)
    assert_no_checkpoint(config)


def test_a_roster_that_grows_is_refused_by_every_silo_and_no_model_is_published(
    tmp_path, pki, monkeypatch, caplog
):
    # Arrange: the coordinator names a survivor that never took part
    original = ServerSession.roster

    def growing_roster(self, silo, task_id, *, until):
        survivors, dropped = original(self, silo, task_id, until=until)
        return sorted([*survivors, "silo-x"]), dropped

    monkeypatch.setattr(ServerSession, "roster", growing_roster)
    config = secure_config(tmp_path, pki=pki)
    reporter = CollectingReporter()
    caplog.set_level("WARNING", logger="fedpriv.secagg.server")
    # Act
    with (
        Coordinator(config, reporter=reporter) as coordinator,
        honest_silos(coordinator.port, pki, SILOS) as outcomes,
    ):
        with pytest.raises(RoundFailed):
            coordinator.wait(timeout_s=120)
        assert_running_and_clean(outcomes)
    # Assert: every silo declined with the reason (so the coordinator stopped waiting
    # for its reveal), none revealed anything, and the round failed without a model
    withdrawn = {
        r.args[1]
        for r in caplog.records
        if r.getMessage().startswith("secagg withdrawn") and "outside this round" in r.getMessage()
    }
    assert withdrawn == set(SILOS)
    assert_no_checkpoint(config)
    assert reporter.failed and "0 silos revealed shares" in reporter.failed[0][1]
