"""Secure aggregation over real gRPC and mTLS: exact sums, an uninformative view, dropouts."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest

from fedpriv.client import runtime
from fedpriv.coordinator import Coordinator, SecAggConfig, Store, read_checkpoint
from fedpriv.coordinator.upload import Upload
from fedpriv.secagg.settings import SecAggSettings
from fedpriv.v1 import fleet_pb2
from tests.apps import RandomUpdateClient, random_update
from tests.conftest import SILOS
from tests.helpers import CollectingReporter, make_config, silo_thread, wait_silos

SHAPES = {"w": (300, 100), "b": (100,)}


def secure_config(tmp_path, pki, *, threshold=0, **rounds):
    config = make_config(
        tmp_path,
        pki.root,
        {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()},
        min_clients=5,
        max_clients=5,  # t must be a majority of every round: bound the round's size
        num_rounds=1,
        federated_evaluation=False,
        chunk_bytes=16 << 10,
        **rounds,
    )
    return dataclasses.replace(
        config, secure_aggregation=SecAggConfig(threshold=threshold, unmask_deadline_s=15)
    )


def test_five_silos_sum_is_exact_and_no_masked_vector_correlates_with_its_update(
    tmp_path, pki, monkeypatch
):
    # Arrange: record every chunk the coordinator receives, by sender
    seen: dict[str, dict[int, bytes]] = {}
    original = Upload.add_chunk

    def spy(self, offset, data):
        seen.setdefault(self.silo, {})[offset] = bytes(data)
        return original(self, offset, data)

    monkeypatch.setattr(Upload, "add_chunk", spy)
    config = secure_config(tmp_path, pki)
    reporter = CollectingReporter()
    # Act
    with Coordinator(config, reporter=reporter) as coordinator, contextlib.ExitStack() as stack:
        outcomes = [
            stack.enter_context(
                silo_thread(RandomUpdateClient(i), port=coordinator.port, tls=pki.tls(name))
            )
            for i, name in enumerate(SILOS)
        ]
        assert coordinator.wait(timeout_s=120)
        wait_silos(outcomes)
    # Assert: the new model is the mean of the five updates, to quantisation error
    store = Store(config.state_dir)
    committed = store.last_committed()
    store.close()
    assert committed is not None and committed.round == 1
    final = read_checkpoint(committed.checkpoint).arrays()
    updates = [random_update(i, SHAPES) for i in range(5)]
    for name in SHAPES:
        expected = np.mean([u[name] for u in updates], axis=0)
        np.testing.assert_allclose(final[name], expected, atol=1e-6)
    # ... while what the coordinator saw of each silo is uncorrelated with its update
    for i, name in enumerate(SILOS):
        chunks = seen[name]
        masked = np.frombuffer(b"".join(chunks[o] for o in sorted(chunks)), dtype="<u4")
        truth = np.concatenate([updates[i]["w"].ravel(), updates[i]["b"].ravel()])
        assert masked.size == truth.size
        correlation = np.corrcoef(masked.astype(np.float64), truth)[0, 1]
        assert abs(correlation) < 0.05, (name, correlation)
        # the masked vector looks uniform over the ring: mean ~ 2^31
        assert abs(masked.astype(np.float64).mean() / 2**31 - 1) < 0.02


class ConfigRecordingClient(RandomUpdateClient):
    """Records the config its fit call gets."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.configs: list[dict] = []

    def fit(self, parameters, *, config):
        self.configs.append(dict(config))
        return super().fit(parameters, config=config)


def test_the_settings_travel_as_the_task_secagg_field_and_not_in_the_config(
    tmp_path, pki, monkeypatch
):
    # Arrange: record every task as the silos receive it off the wire
    sent: list[fleet_pb2.Task] = []
    original = runtime.receive_task

    def spy(task, stream, **kwargs):
        sent.append(task)
        return original(task, stream, **kwargs)

    monkeypatch.setattr(runtime, "receive_task", spy)
    config = secure_config(tmp_path, pki)
    clients = [ConfigRecordingClient(i) for i in range(len(SILOS))]
    # Act
    with Coordinator(config) as coordinator, contextlib.ExitStack() as stack:
        outcomes = [
            stack.enter_context(silo_thread(client, port=coordinator.port, tls=pki.tls(name)))
            for client, name in zip(clients, SILOS, strict=True)
        ]
        assert coordinator.wait(timeout_s=120)
        wait_silos(outcomes)
    # Assert
    train = [t for t in sent if t.kind == fleet_pb2.TASK_KIND_TRAIN]
    assert len(train) >= len(SILOS)
    settings = [SecAggSettings.from_proto(t.secagg) for t in train]
    assert len({s.session for s in settings}) == 1 and len(set(settings)) == 1
    assert settings[0].size == sum(int(np.prod(shape)) for shape in SHAPES.values())
    assert settings[0].threshold == 3 and settings[0].ring_bits == 32
    assert all(t.compression == fleet_pb2.COMPRESSION_NONE for t in train)
    for task in train:
        assert not [k for k in task.config if k.startswith("secagg") or k == "compression"]
    for client in clients:
        assert client.configs and all(set(c) == {"round"} for c in client.configs)


def test_a_silo_cannot_advertise_keys_in_another_silos_name(tmp_path, pki):
    # Arrange: silo-b..silo-e run normally; silo-a is driven by hand over its own mTLS channel
    import grpc

    from fedpriv.secagg import crypto
    from fedpriv.transport import open_channel
    from fedpriv.v1 import fleet_pb2, fleet_pb2_grpc

    config = secure_config(tmp_path, pki, threshold=3, min_results=3)
    with Coordinator(config) as coordinator, contextlib.ExitStack() as stack:
        outcomes = [
            stack.enter_context(
                silo_thread(RandomUpdateClient(i), port=coordinator.port, tls=pki.tls(name))
            )
            for i, name in enumerate(SILOS[1:], start=1)
        ]
        channel = open_channel(f"127.0.0.1:{coordinator.port}", tls=pki.tls("silo-a"))
        stub = fleet_pb2_grpc.FleetStub(channel)
        stub.Join(fleet_pb2.JoinRequest(sdk_version="test"), timeout=10)
        task = None
        for _ in range(20):
            messages = list(stub.PullTask(fleet_pb2.PullTaskRequest(wait_s=2), timeout=30))
            if messages[0].task.kind == fleet_pb2.TASK_KIND_TRAIN:
                task = messages[0].task
                break
        assert task is not None
        other_task = coordinator.federation.phase.tasks["silo-b"]  # test-only peek
        cipher, mask = crypto.KeyPair().public_bytes, crypto.KeyPair().public_bytes
        keys = fleet_pb2.AdvertiseKeys(cipher_public_key=cipher, mask_public_key=mask)
        # Act: silo-a presents silo-b's task id with its own certificate
        with pytest.raises(grpc.RpcError) as refused:
            stub.SecAgg(
                fleet_pb2.SecAggRequest(task_id=other_task, round=1, advertise=keys), timeout=10
            )
        # ... and then advertises for itself: its keys are listed under its own name only
        reply = stub.SecAgg(
            fleet_pb2.SecAggRequest(task_id=task.task_id, round=1, advertise=keys), timeout=30
        )
        # ... then leaves: the honest silos finish the round without it
        stub.Leave(fleet_pb2.LeaveRequest(reason="test"), timeout=10)
        channel.close()
        assert coordinator.wait(timeout_s=120)
    # Assert: every honest silo trained and ended normally, and their mean was committed
    for outcome in outcomes:
        assert "error" not in outcome, outcome["error"]
        assert outcome["stats"].trained == 1
    store = Store(config.state_dir)
    committed = store.last_committed()
    store.close()
    final = read_checkpoint(committed.checkpoint).arrays()
    updates = [random_update(i, SHAPES) for i in range(1, 5)]
    for name in SHAPES:
        np.testing.assert_allclose(
            final[name], np.mean([u[name] for u in updates], axis=0), atol=1e-6
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "silo-a" in refused.value.details() and other_task in refused.value.details()
    listed = {p.silo: (p.cipher_public_key, p.mask_public_key) for p in reply.peers}
    assert sorted(listed) == sorted(SILOS)
    assert listed["silo-a"] == (cipher, mask)
    assert all(listed[name] != listed["silo-a"] for name in SILOS[1:])


def test_distributed_dp_accounts_only_the_noise_beyond_the_tolerated_colluders(
    tmp_path, pki, caplog
):
    # Arrange: three silos, t = 2 (a majority), one colluder tolerated
    from fedpriv.privacy.accounting import SkellamSum, epsilon_from_rdp, total_rdp
    from fedpriv.privacy.central import CentralDP
    from fedpriv.secagg import RingCodec

    config = make_config(
        tmp_path,
        pki.root,
        {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()},
        min_clients=3,
        max_clients=3,
        num_rounds=1,
        federated_evaluation=False,
        chunk_bytes=16 << 10,
        dp=CentralDP(noise_multiplier=1.0, clip_norm=1.0, expected_clients=3),
    )
    config = dataclasses.replace(
        config, secure_aggregation=SecAggConfig(tolerate_colluders=1, unmask_deadline_s=15)
    )
    caplog.set_level("INFO", logger="fedpriv.coordinator")
    # Act
    with Coordinator(config) as coordinator, contextlib.ExitStack() as stack:
        outcomes = [
            stack.enter_context(
                silo_thread(RandomUpdateClient(i), port=coordinator.port, tls=pki.tls(name))
            )
            for i, name in enumerate(SILOS[:3])
        ]
        assert coordinator.wait(timeout_s=120)
        wait_silos(outcomes)
    store = Store(config.state_dir)
    federation = {name: value for _, _, name, value in store.metrics(source="federation")}
    store.close()
    # Assert: each silo's noise was sized for t - k = 1 honest survivor ...
    size = sum(int(np.prod(shape)) for shape in SHAPES.values())
    codec = RingCodec.plan(
        clip_norm=1.0, size=size, clients=3, threshold=2, noise_multiplier=1.0, tolerate_colluders=1
    )
    assert codec.noise_variance == pytest.approx((codec.scale * 1.0 * 1.0) ** 2)
    # ... the release accounts the noise of survivors - k = 2 silos, and says so
    assert federation["colluders_tolerated"] == 1
    assert federation["skellam_mu"] == pytest.approx(2 * codec.noise_variance, rel=1e-12)
    release = SkellamSum(
        mu=federation["skellam_mu"],
        l1_sensitivity=federation["l1_sensitivity"],
        l2_sensitivity=federation["l2_sensitivity"],
    )
    assert federation["epsilon"] == pytest.approx(
        epsilon_from_rdp(total_rdp([release]), delta=federation["delta"])
    )
    assert any(
        "distributed dp round=1" in r.getMessage() and "colluders_tolerated=1" in r.getMessage()
        for r in caplog.records
    )
