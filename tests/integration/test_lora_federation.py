"""Only LoRA adapters travel: a federation of a tiny GPT-2 over real gRPC, every byte recorded."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3

import numpy as np

from fedpriv.coordinator import ModelSource, Store, read_checkpoint
from tests.helpers import make_config
from tests.hf_models import BLOCK, lora_gpt2, pattern_tokens
from tests.integration.test_no_raw_data import recorded_federation

FACTORY = "tests.hf_models:lora_gpt2"


class KeepsUpdates:
    """Wraps a client and keeps the bytes of each update it returned (positive control)."""

    def __init__(self, inner):
        self.inner = inner
        self.updates: list[bytes] = []

    def model_shapes(self):
        return self.inner.model_shapes()

    def fit(self, parameters, *, config):
        result = self.inner.fit(parameters, config=config)
        self.updates += [np.ascontiguousarray(a).tobytes() for a in result.parameters.values()]
        return result

    def evaluate(self, parameters, *, config):
        return self.inner.evaluate(parameters, config=config)


def silo(seed: int):
    from fedpriv.client.hf import TokenBlocks, causal_lm_client

    return causal_lm_client(
        lora_gpt2(),
        train=TokenBlocks(pattern_tokens(32 * BLOCK, seed=seed), block_size=BLOCK),
        val=TokenBlocks(pattern_tokens(8 * BLOCK, seed=seed + 50), block_size=BLOCK),
        batch_size=16,
        learning_rate=0.02,
        device="cpu",
    )


def test_only_the_adapters_cross_the_wire_and_the_base_never_does(tmp_path):
    # Arrange: plain text through a recording proxy, so the bytes are what a reader sees
    config = make_config(tmp_path, None, {"unused": np.zeros(1, np.float32)}, num_rounds=2)
    config = dataclasses.replace(config, model=ModelSource(factory=FACTORY))
    clients = [KeepsUpdates(silo(1)), KeepsUpdates(silo(2))]
    base = {
        name: tensor.detach().numpy().copy()
        for name, tensor in clients[0].inner.model.state_dict().items()
        if "lora_" not in name
    }
    adapter_bytes = sum(a.nbytes for a in clients[0].inner._exchanged().values())
    model_bytes = adapter_bytes + sum(a.nbytes for a in base.values())
    # Act
    stats, raw, messages = recorded_federation(config, clients)
    # Assert: two rounds, the coordinator's model is the adapters alone
    assert all(s is not None and s.trained == 2 for s in stats), stats
    store = Store(config.state_dir)
    committed = store.last_committed()
    store.close()
    assert committed is not None and committed.round == 2
    final = read_checkpoint(committed.checkpoint, sha256=committed.sha256).arrays()
    assert final and all(".lora_A." in n or ".lora_B." in n for n in final)
    # each silo's update per round is exactly the adapters' bytes
    with contextlib.closing(sqlite3.connect(config.state_dir / "state.sqlite3")) as db:
        sent = [
            n for (n,) in db.execute("SELECT bytes_received FROM participants WHERE task = 'train'")
        ]
    print(
        f"per silo per round: {sent} bytes; adapters {adapter_bytes} B, whole model {model_bytes} B"
    )
    assert len(sent) == 4 and all(n == adapter_bytes for n in sent), sent
    assert model_bytes > 20 * adapter_bytes
    # the recording holds the updates (a leak would be visible) and no base tensor's bytes
    for client in clients:
        assert all(any(u in m for m in messages) for u in client.updates if u.strip(b"\0"))
    for name, tensor in base.items():
        flat = tensor.ravel()
        if flat.dtype.kind != "f" or flat.size < 16:
            continue
        for start in range(0, flat.size - 16 + 1, max(flat.size // 8, 16)):
            piece = flat[start : start + 16].tobytes()
            assert not any(piece in m for m in messages), name
            assert not any(piece in r for r in raw), name
