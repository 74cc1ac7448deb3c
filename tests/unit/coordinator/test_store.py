from __future__ import annotations

import numpy as np
import pytest

from fedpriv.coordinator import Store, read_checkpoint, write_checkpoint
from fedpriv.errors import StoreError
from fedpriv.wire import Model


def test_checkpoint_roundtrip_and_hash(tmp_path):
    model = Model.from_arrays({"w": np.arange(10, dtype=np.float32), "n": np.array(3)})
    digest = write_checkpoint(tmp_path / "m.fpck", model)
    back = read_checkpoint(tmp_path / "m.fpck", sha256=digest)
    np.testing.assert_array_equal(back.payload, model.payload)
    assert back.layout == model.layout


def test_corrupt_or_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "m.fpck"
    digest = write_checkpoint(path, Model.from_arrays({"w": np.arange(10, dtype=np.float32)}))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="SHA-256 differs"):
        read_checkpoint(path, sha256=digest)
    path.write_bytes(bytes(data[:-4]))
    with pytest.raises(StoreError, match="payload length"):
        read_checkpoint(path)
    with pytest.raises(StoreError, match="cannot read"):
        read_checkpoint(tmp_path / "missing.fpck")


def test_committed_rounds_survive_reopening(tmp_path):
    store = Store(tmp_path)
    model = Model.from_arrays({"w": np.ones(4, np.float32)})
    for round in (0, 1, 2):
        store.commit_round(
            round=round, model=model, started_unix_s=0.0, selected=2, accepted=2, total_weight=5.0
        )
    store.record_metrics(
        round=2, source="evaluate", values={"accuracy": 0.9, "note": "x", "flag": True}
    )
    store.close()
    # An orphan checkpoint (crash after rename, before commit) does not count.
    write_checkpoint(Store(tmp_path).checkpoint_path(3), model)
    reopened = Store(tmp_path)
    last = reopened.last_committed()
    assert last is not None and last.round == 2
    assert reopened.rounds() == [0, 1, 2]
    assert list(reopened.metrics(source="evaluate")) == [(2, "evaluate", "accuracy", 0.9)]
    reopened.close()
