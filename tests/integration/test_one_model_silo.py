"""A TorchClient on the CPU receives each model straight into its parameters (mTLS)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpriv import TorchClient
from fedpriv.coordinator import Coordinator, Store, read_checkpoint
from fedpriv.wire import Compression
from fedpriv.wire.torch_interop import arrays_from_state_dict
from tests.helpers import make_config, silo_thread, wait_silos


def make_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 3))


def silo(seed: int) -> TorchClient:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 16, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return TorchClient(
        make_model(),
        train_loader=DataLoader(TensorDataset(x, y), batch_size=32),
        loss_fn=nn.functional.cross_entropy,
        optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1),
        device="cpu",
    )


def federate(tmp_path, pki, clients, **rounds):
    initial = arrays_from_state_dict(make_model().state_dict())
    config = make_config(
        tmp_path, pki.root, {k: v.copy() for k, v in initial.items()}, num_rounds=3, **rounds
    )
    with Coordinator(config) as coordinator:
        with (
            silo_thread(clients[0], port=coordinator.port, tls=pki.tls("silo-a")) as a,
            silo_thread(clients[1], port=coordinator.port, tls=pki.tls("silo-b")) as b,
        ):
            assert coordinator.wait(timeout_s=120)
            stats = wait_silos([a, b])
    assert all(s is not None and s.trained == 3 for s in stats), stats
    store = Store(config.state_dir)
    committed = store.last_committed()
    store.close()
    return read_checkpoint(committed.checkpoint, sha256=committed.sha256).arrays()


def _inside(client: TorchClient) -> bool:
    flat = client._flat
    if flat is None:
        return False
    start, end = flat.ctypes.data, flat.ctypes.data + flat.nbytes
    return all(start <= t.data_ptr() < end for t in client.model.state_dict().values())


def test_the_parameters_are_views_of_the_received_model_and_training_is_unchanged(tmp_path, pki):
    # Arrange: the same federation twice, zero-copy receive on and (as before) off
    zero_copy = [silo(1), silo(2)]
    copying = [silo(1), silo(2)]
    for client in copying:
        client.receive_buffer = lambda layout: None  # the runtime copies the model in
    # Act
    final = federate(tmp_path / "zero-copy", pki, zero_copy)
    before = federate(tmp_path / "copying", pki, copying)
    # Assert: the parameters live in the buffer the model was received into...
    assert all(_inside(c) for c in zero_copy)
    assert not any(_inside(c) for c in copying)
    # ...and the federation computed the same models either way (float32 training on
    # the same data from the same start; the silos' data order is fixed)
    assert sorted(final) == sorted(before)
    for name in final:
        np.testing.assert_allclose(final[name], before[name], rtol=1e-5, atol=1e-6)


def test_an_update_sent_as_a_difference_keeps_the_received_model_apart(tmp_path, pki):
    # fp16 update compression sends new - received: a training task's received model
    # must not be the memory training changes (the difference would be 0), so the
    # runtime receives it apart. Evaluation tasks may still land in the parameters.
    zero_copy = [silo(1), silo(2)]
    copying = [silo(1), silo(2)]
    for client in copying:
        client.receive_buffer = lambda layout: None
    final = federate(tmp_path / "zero-copy", pki, zero_copy, update_compression=Compression.FP16)
    before = federate(tmp_path / "copying", pki, copying, update_compression=Compression.FP16)
    initial = arrays_from_state_dict(make_model().state_dict())
    assert any(not np.allclose(final[n], initial[n], atol=1e-3) for n in final)
    for name in final:
        np.testing.assert_allclose(final[name], before[name], rtol=1e-4, atol=1e-5)
