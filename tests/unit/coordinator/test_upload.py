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
