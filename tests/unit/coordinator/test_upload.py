from __future__ import annotations

import numpy as np
import pytest

from fedpriv.coordinator.upload import Upload
from fedpriv.errors import ProtocolError, UpdateRejected
from fedpriv.strategy import FedAvg
from fedpriv.wire import Model


def make(tmp_path, base):
    aggregator = FedAvg().begin_round(1, model=base)
    upload = Upload(
        silo="s",
        round=1,
        layout=base.layout,
        aggregator=aggregator,
        num_examples=4,
        metrics={},
        spool_dir=tmp_path,
    )
    return aggregator, upload


def test_stream_cut_half_way_leaves_no_trace_in_the_aggregate(tmp_path):
    base = Model.from_arrays({"w": np.zeros(1000, np.float32)}, chunk_bytes=512)
    aggregator, upload = make(tmp_path, base)
    good = Model.from_arrays({"w": np.full(1000, 3.0, np.float32)}, chunk_bytes=512)
    other = FedAvg().begin_round(1, model=base)  # unused; proves aggregators are independent
    chunks = list(good.chunks())
    for offset, chunk in chunks[:5]:
        upload.add_chunk(offset, bytes(chunk))
    assert upload.cancel("stream broken")
    with pytest.raises(ProtocolError):
        upload.add_chunk(*chunks[5])
    for offset, chunk in good.chunks():
        aggregator.fold(offset, chunk, weight=1.0)
    np.testing.assert_array_equal(
        aggregator.finalize(total_weight=1.0).arrays()["w"], np.full(1000, 3.0)
    )
    del other


def test_nan_in_a_late_chunk_rejects_and_undoes_earlier_chunks(tmp_path):
    base = Model.from_arrays({"w": np.zeros(1000, np.float32)}, chunk_bytes=512)
    aggregator, upload = make(tmp_path, base)
    values = np.full(1000, 3.0, np.float32)
    values[900] = np.nan
    values[10] = np.inf
    for offset, chunk in Model.from_arrays({"w": values}, chunk_bytes=512).chunks():
        upload.add_chunk(offset, bytes(chunk))
    with pytest.raises(UpdateRejected, match="w: 2 NaN or infinite values"):
        upload.finish()
    np.testing.assert_array_equal(
        aggregator.finalize(total_weight=1.0).arrays()["w"], np.zeros(1000)
    )


def test_truncated_stream_is_rejected(tmp_path):
    base = Model.from_arrays({"w": np.zeros(1000, np.float32)}, chunk_bytes=512)
    aggregator, upload = make(tmp_path, base)
    offset, chunk = next(
        Model.from_arrays({"w": np.ones(1000, np.float32)}, chunk_bytes=512).chunks()
    )
    upload.add_chunk(offset, bytes(chunk))
    with pytest.raises(UpdateRejected, match="stream ended after 512 of 4000 bytes"):
        upload.finish()
    np.testing.assert_array_equal(
        aggregator.finalize(total_weight=1.0).arrays()["w"], np.zeros(1000)
    )


def clipping_upload(tmp_path, base, clip_norm):
    aggregator = FedAvg().begin_round(1, model=base)
    upload = Upload(
        silo="s",
        round=1,
        layout=base.layout,
        aggregator=aggregator,
        num_examples=7,
        metrics={},
        spool_dir=tmp_path,
        weight=1.0,
        base=base,
        clip_norm=clip_norm,
    )
    return aggregator, upload


def test_update_longer_than_clip_norm_is_scaled_onto_the_ball(tmp_path):
    # Arrange: base 1.0 everywhere, update moves it by +2 (norm 2 * sqrt(1000) = 63.2)
    base = Model.from_arrays(
        {"w": np.ones(1000, np.float32), "b": np.ones(24, np.float64)}, chunk_bytes=512
    )
    aggregator, upload = clipping_upload(tmp_path, base, clip_norm=1.0)
    sent = Model.from_arrays(
        {"w": np.full(1000, 3.0, np.float32), "b": np.full(24, 3.0)}, chunk_bytes=512
    )
    # Act
    for offset, chunk in sent.chunks():
        upload.add_chunk(offset, bytes(chunk))
    result = upload.finish()
    upload.fold()
    out = aggregator.finalize(total_weight=1.0).arrays()
    # Assert: w_global + clipped delta, with ||clipped delta|| == 1
    norm = 2.0 * np.sqrt(1024)
    assert result.update_norm == pytest.approx(norm)
    assert result.clip_scale == pytest.approx(1.0 / norm)
    delta = np.concatenate([out["w"] - 1.0, out["b"] - 1.0])
    assert np.linalg.norm(delta) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(out["w"], 1.0 + 2.0 / norm, rtol=1e-6)


def test_update_within_clip_norm_is_unchanged_and_weighted_equally(tmp_path):
    base = Model.from_arrays({"w": np.zeros(100, np.float32)}, chunk_bytes=128)
    aggregator, upload = clipping_upload(tmp_path, base, clip_norm=10.0)
    for offset, chunk in Model.from_arrays(
        {"w": np.full(100, 0.5, np.float32)}, chunk_bytes=128
    ).chunks():
        upload.add_chunk(offset, bytes(chunk))
    result = upload.finish()
    upload.fold()
    assert result.clip_scale == 1.0 and result.update_norm == pytest.approx(5.0)
    # weight 1.0, not num_examples (7): the sum holds the update once
    np.testing.assert_allclose(aggregator.finalize(total_weight=1.0).arrays()["w"], 0.5)


def test_a_finished_upload_is_in_the_aggregate_only_once_folded(tmp_path):
    base = Model.from_arrays({"w": np.ones(1000, np.float32)}, chunk_bytes=512)
    aggregator, upload = clipping_upload(tmp_path, base, clip_norm=1.0)
    for offset, chunk in Model.from_arrays(
        {"w": np.full(1000, 9.0, np.float32)}, chunk_bytes=512
    ).chunks():
        upload.add_chunk(offset, bytes(chunk))
    upload.finish()
    assert not upload.cancel("round closed")  # finished: the round decides, not cancel
    upload.release()  # the round closed as it finished: it is given up, not subtracted
    with pytest.raises(RuntimeError, match="only a finished upload is folded"):
        upload.fold()  # its spool went back
    np.testing.assert_array_equal(aggregator.finalize(total_weight=1.0).arrays()["w"], 0.0)


def test_compressed_chunk_of_the_wrong_length_rejects_the_update(tmp_path):
    from fedpriv.wire import Compression

    base = Model.from_arrays({"w": np.zeros(1000, np.float32)}, chunk_bytes=512)
    aggregator = FedAvg().begin_round(1, model=base)
    upload = Upload(
        silo="s",
        round=1,
        layout=base.layout,
        aggregator=aggregator,
        num_examples=1,
        metrics={},
        spool_dir=tmp_path,
        base=base,
        compression=Compression.INT8,
    )
    good, _ = Compression.INT8.compress(np.full(128, 0.5, np.float32))
    upload.add_chunk(0, good)
    upload.add_chunk(512, good[:-1])
    with pytest.raises(UpdateRejected, match="int8 chunk at offset 512: 131 bytes, expected 132"):
        upload.finish()
    np.testing.assert_array_equal(aggregator.finalize(total_weight=1.0).arrays()["w"], 0.0)


def test_a_reused_spool_undoes_only_its_own_upload(tmp_path):
    # Arrange: one pooled spool file, first filled by a longer, accepted upload
    from fedpriv.coordinator.upload import SpoolPool

    pool = SpoolPool(tmp_path, keep=1)
    base = Model.from_arrays({"w": np.zeros(1000, np.float32)}, chunk_bytes=512)
    aggregator = FedAvg().begin_round(1, model=base)

    def upload(value: float) -> tuple[Upload, list]:
        made = Upload(
            silo="s", round=1, layout=base.layout, aggregator=aggregator, num_examples=1,
            metrics={}, spool_dir=tmp_path, spools=pool,
        )  # fmt: skip
        model = Model.from_arrays({"w": np.full(1000, value, np.float32)}, chunk_bytes=512)
        return made, [(o, bytes(c)) for o, c in model.chunks()]

    first, chunks = upload(5.0)
    for chunk in chunks:
        first.add_chunk(*chunk)
    first.finish()
    first.fold()
    # Act: the next upload takes the same file, folds 3 chunks and is cut off
    second, chunks = upload(7.0)
    assert second._spool is not None and pool._free == []
    for chunk in chunks[:3]:
        second.add_chunk(*chunk)
    assert second.cancel("stream broken")
    # Assert: only the first upload remains; the file went back to the pool
    np.testing.assert_array_equal(
        aggregator.finalize(total_weight=1.0).arrays()["w"], np.full(1000, 5.0)
    )
    assert len(pool._free) == 1
    pool.close()


def _attack_streams(layout):
    """Upload attempts that each fail after streaming a chunk of 1e30, or a huge update."""
    huge = Model.from_arrays({"w": np.full(1000, 1e30, np.float32)}, chunk_bytes=512)
    nan = Model.from_arrays({"w": np.full(1000, np.nan, np.float32)}, chunk_bytes=512)
    beyond = Model.from_arrays({"w": np.full(1000, 3e38, np.float32)}, chunk_bytes=512)
    h0, huge0 = next(huge.chunks())
    return {
        "huge_then_nan": ([(h0, huge0), *list(nan.chunks())[1:]], "finish", "non_finite"),
        "huge_then_cancel": ([(h0, huge0)], "cancel", None),
        "huge_then_truncated": ([(h0, huge0)], "finish", "stream"),
        "huge_then_out_of_order": ([(h0, huge0), (h0, huge0)], "finish", "stream"),
        "beyond_the_bound": ([(o, bytes(c)) for o, c in beyond.chunks()], "finish", "bounds"),
    }


@pytest.mark.parametrize(
    "attack", sorted(_attack_streams(Model.from_arrays({"w": np.zeros(1)}).layout))
)
@pytest.mark.parametrize("clip_norm", [None, 1.0], ids=["fedavg", "clipped"])
def test_a_failed_upload_leaves_the_aggregator_bit_identical(tmp_path, attack, clip_norm):
    # Arrange: the same honest upload folded into two aggregators
    rng = np.random.default_rng(3)
    base = Model.from_arrays({"w": rng.normal(size=1000).astype(np.float32)}, chunk_bytes=512)
    honest = Model.from_arrays({"w": rng.normal(size=1000).astype(np.float32)}, chunk_bytes=512)
    aggregators = [FedAvg().begin_round(1, model=base) for _ in range(2)]

    def upload_to(aggregator):
        return Upload(
            silo="s", round=1, layout=base.layout, aggregator=aggregator, num_examples=1000,
            metrics={}, spool_dir=tmp_path, base=base, clip_norm=clip_norm,
            weight=1.0 if clip_norm else None, max_value=1e6,
        )  # fmt: skip

    for aggregator in aggregators:
        upload = upload_to(aggregator)
        for offset, chunk in honest.chunks():
            upload.add_chunk(offset, bytes(chunk))
        upload.finish()
        upload.fold()
    chunks, ending, reason = _attack_streams(base.layout)[attack]
    # Act: the attack goes to the first aggregator only
    attacker = upload_to(aggregators[0])
    for chunk in chunks:
        attacker.add_chunk(*chunk)
    if ending == "cancel":
        assert attacker.cancel("stream broken")
    else:
        with pytest.raises(UpdateRejected) as caught:
            attacker.finish()
        assert caught.value.reason == reason
    # Assert: both sums are the same, bit for bit
    attacked, untouched = (a.finalize(total_weight=1.0) for a in aggregators)
    assert bytes(attacked.payload) == bytes(untouched.payload)
    assert np.isfinite(attacked.arrays()["w"]).all()


def test_values_beyond_the_bound_are_counted_per_tensor_apart_from_non_finite_ones(tmp_path):
    base = Model.from_arrays(
        {"w": np.zeros(100, np.float32), "h": np.zeros(8, np.float16)}, chunk_bytes=128
    )
    upload = Upload(
        silo="s", round=1, layout=base.layout, aggregator=FedAvg().begin_round(1, model=base),
        num_examples=1, metrics={}, spool_dir=tmp_path, max_value=10.0,
    )  # fmt: skip
    w = np.zeros(100, np.float32)
    w[[1, 2, 3]] = [11.0, -1e30, np.inf]
    w[50] = np.nan
    h = np.array([0, 65504, -np.inf, 0, 0, 0, 0, 10], np.float16)
    for offset, chunk in Model.from_arrays({"w": w, "h": h}, layout=base.layout).chunks():
        upload.add_chunk(offset, bytes(chunk))
    with pytest.raises(UpdateRejected) as caught:
        upload.finish()
    assert caught.value.reason == "non_finite"
    assert "w: 2 NaN or infinite values" in str(caught.value)
    assert "h: 1 NaN or infinite values" in str(caught.value)
    assert "w: 2 values beyond ±10 (rounds.max_update_value)" in str(caught.value)
    assert "h: 1 values beyond ±10" in str(caught.value)
