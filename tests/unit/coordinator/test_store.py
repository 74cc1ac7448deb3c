from __future__ import annotations

import contextlib
import pathlib
import sqlite3
import sys

import numpy as np
import pytest

from fedpriv.coordinator import Store, map_checkpoint, read_checkpoint, write_checkpoint
from fedpriv.errors import StoreError
from fedpriv.wire import Model


def test_checkpoint_roundtrip_and_hash(tmp_path):
    model = Model.from_arrays({"w": np.arange(10, dtype=np.float32), "n": np.array(3)})
    digest = write_checkpoint(tmp_path / "m.fpck", model)
    back = read_checkpoint(tmp_path / "m.fpck", sha256=digest)
    np.testing.assert_array_equal(back.payload, model.payload)
    assert back.layout == model.layout


@pytest.mark.parametrize("load", [read_checkpoint, map_checkpoint])
def test_corrupt_or_truncated_checkpoint_is_refused(tmp_path, load):
    path = tmp_path / "m.fpck"
    digest = write_checkpoint(path, Model.from_arrays({"w": np.arange(10, dtype=np.float32)}))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="SHA-256 differs"):
        load(path, sha256=digest)
    path.write_bytes(bytes(data[:-4]))
    with pytest.raises(StoreError, match="payload length"):
        load(path)
    with pytest.raises(StoreError, match="cannot read"):
        load(tmp_path / "missing.fpck")


def _mapped_kib(path):
    """KiB of `path`'s mapping resident in this process (Linux smaps)."""
    total, inside = 0, False
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_mapped_checkpoint_reads_like_the_file(tmp_path):
    model = Model.from_arrays({"w": np.arange(100_000, dtype=np.float32), "n": np.array(3)})
    path = tmp_path / "m.fpck"
    digest = write_checkpoint(path, model)
    mapped = map_checkpoint(path, sha256=digest)
    assert mapped.layout == model.layout
    np.testing.assert_array_equal(mapped.payload, model.payload)
    assert not mapped.payload.flags.writeable
    assert [(o, bytes(c)) for o, c in mapped.chunks()] == [(o, bytes(c)) for o, c in model.chunks()]


@pytest.mark.skipif(sys.platform != "linux", reason="reads resident pages from /proc/self/smaps")
def test_evicted_chunks_leave_the_process_but_keep_their_bytes(tmp_path):
    model = Model.from_arrays({"w": np.arange(4_000_000, dtype=np.float32)})  # 16 MB
    path = tmp_path / "m.fpck"
    write_checkpoint(path, model)
    mapped = map_checkpoint(path)
    served = b"".join(bytes(chunk) for _, chunk in mapped.chunks())
    assert _mapped_kib(path) >= 15_000  # every page was read, so mapped in
    for offset, chunk in mapped.chunks():
        mapped.evict(offset, len(chunk))
    assert _mapped_kib(path) <= 8  # at most the header's page
    assert b"".join(bytes(c) for _, c in mapped.chunks()) == served == model.payload.tobytes()
    in_memory = Model.from_arrays({"w": np.ones(4, np.float32)})
    in_memory.evict(0, 16)  # a payload in ordinary memory: nothing to do
    assert in_memory.arrays()["w"].tolist() == [1.0] * 4


def test_committed_rounds_survive_reopening(tmp_path):
    store = Store(tmp_path)
    model = Model.from_arrays({"w": np.ones(4, np.float32)})
    for round in (0, 1, 2):
        store.commit_staged(
            store.stage_round(
                round=round,
                model=model,
                started_unix_s=0.0,
                selected=2,
                accepted=2,
                total_weight=5.0,
            )
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


def test_a_round_its_metrics_and_its_attempt_commit_together(tmp_path):
    store = Store(tmp_path)
    staged = store.stage_round(
        round=1,
        model=Model.from_arrays({"w": np.ones(4, np.float32)}),
        started_unix_s=10.0,
        selected=2,
        accepted=2,
        total_weight=5.0,
        metrics={"fit": {"loss": 0.5}, "silo:a": {"epsilon": 1.5}},
        record_attempt=True,
    )
    store.commit_staged(staged)
    store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "state.sqlite3")) as db:
        attempts = db.execute("SELECT round, started_unix_s, outcome FROM attempts").fetchall()
    assert attempts == [(1, 10.0, "completed")]
    reopened = Store(tmp_path)
    assert sorted(reopened.metrics()) == [(1, "fit", "loss", 0.5), (1, "silo:a", "epsilon", 1.5)]
    reopened.close()


def test_a_staged_round_is_readable_at_once_and_committed_only_when_asked(tmp_path):
    store = Store(tmp_path)
    model = Model.from_arrays({"w": np.arange(1000, dtype=np.float32)})
    staged = store.stage_round(
        round=1, model=model, started_unix_s=0.0, selected=2, accepted=2, total_weight=2.0
    )
    # Readable before it is durable: the coordinator serves it from here.
    mapped = map_checkpoint(staged.temporary, sha256=staged.sha256)
    np.testing.assert_array_equal(mapped.payload, model.payload)
    assert store.last_committed() is None and not staged.checkpoint.exists()
    committed = store.commit_staged(staged)
    assert store.last_committed() == committed and committed.checkpoint.exists()
    assert not staged.temporary.exists()
    np.testing.assert_array_equal(mapped.payload, model.payload)  # the mapping survives the rename
    # A crash between staging and committing leaves an orphan that no round refers to.
    orphan = store.stage_round(
        round=2, model=model, started_unix_s=0.0, selected=2, accepted=2, total_weight=2.0
    )
    store.close()
    reopened = Store(tmp_path)
    assert reopened.last_committed() == committed
    assert reopened.remove_orphans() == [orphan.temporary] and not orphan.temporary.exists()
    reopened.close()


def test_a_checkpoint_published_without_its_round_row_is_an_orphan_too(tmp_path):
    # A crash after the checkpoint's rename and before the SQLite transaction leaves
    # a file under its final name that no committed round refers to.
    store = Store(tmp_path)
    model = Model.from_arrays({"w": np.arange(10, dtype=np.float32)})
    _commit(store, 1, model)
    staged = store.stage_round(
        round=2, model=model, started_unix_s=0.0, selected=2, accepted=2, total_weight=2.0
    )
    staged.temporary.rename(staged.checkpoint)
    store.close()
    reopened = Store(tmp_path)
    assert reopened.remove_orphans() == [staged.checkpoint] and not staged.checkpoint.exists()
    assert reopened.checkpoint_path(1).exists() and reopened.rounds() == [1]
    reopened.close()


def _commit(store: Store, round: int, model: Model) -> None:
    store.commit_staged(
        store.stage_round(
            round=round, model=model, started_unix_s=0.0, selected=2, accepted=2, total_weight=2.0
        )
    )


def test_keep_checkpoints_deletes_all_but_the_newest_and_the_initial_model(tmp_path):
    model = Model.from_arrays({"w": np.ones(4, np.float32)})
    store = Store(tmp_path, keep_checkpoints=2)
    for round in range(6):
        _commit(store, round, model)
    # A deletion a crash undid, and an orphan newer than the last commit.
    write_checkpoint(store.checkpoint_path(2), model)
    write_checkpoint(store.checkpoint_path(6), model)
    assert store.prune_checkpoints(5) == [2]
    on_disk = sorted(p.name for p in store.checkpoints.iterdir())
    assert on_disk == [f"round-00000{r}.fpck" for r in (0, 4, 5, 6)]
    assert store.rounds() == [0, 1, 2, 3, 4, 5]  # the history stays in the database
    last = store.last_committed()
    assert last is not None and last.round == 5
    np.testing.assert_array_equal(
        map_checkpoint(last.checkpoint, sha256=last.sha256).payload, model.payload
    )
    store.close()


def test_every_checkpoint_is_kept_by_default_and_a_negative_count_is_refused(tmp_path):
    model = Model.from_arrays({"w": np.ones(4, np.float32)})
    store = Store(tmp_path)
    for round in range(4):
        _commit(store, round, model)
    assert store.prune_checkpoints(3) == []
    assert len(list(store.checkpoints.iterdir())) == 4
    store.close()
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 0"):
        Store(tmp_path, keep_checkpoints=-1)
