"""A silo reuses its receive buffer only when no array of the last task is alive."""

from __future__ import annotations

import numpy as np

from fedpriv.client.connection import ReceiveBuffer as _ReceiveBuffer
from fedpriv.wire import Model, PayloadAssembler, arrays_from_payload


def fill(layout, model, buffer):
    assembler = PayloadAssembler(layout, buffer=buffer)
    for offset, chunk in model.chunks():
        assembler.add(offset, bytes(chunk))
    return assembler.finish()


def test_buffer_is_reused_when_free_and_never_while_a_view_is_alive():
    first = Model.from_arrays({"w": np.arange(1000, dtype=np.float32)}, chunk_bytes=512)
    second = Model.from_arrays({"w": -np.arange(1000, dtype=np.float32)}, chunk_bytes=512)
    buffers = _ReceiveBuffer()
    payload = fill(first.layout, first, None)
    kept_by_client = arrays_from_payload(first.layout, payload)["w"]
    buffers.keep(payload)
    del payload
    # A client still holds the last round's parameters: a new buffer, and theirs is intact.
    assert buffers.take(first.layout) is None
    payload = fill(second.layout, second, None)
    np.testing.assert_array_equal(kept_by_client, np.arange(1000))
    del kept_by_client
    buffers.keep(payload)
    address = payload.ctypes.data
    del payload
    # Nothing holds it now: the same memory is filled again.
    reused = buffers.take(first.layout)
    assert reused is not None and reused.ctypes.data == address
    np.testing.assert_array_equal(
        arrays_from_payload(first.layout, fill(first.layout, first, reused))["w"], np.arange(1000)
    )
    # A different model size never reuses it.
    buffers.keep(reused)
    del reused
    small = Model.from_arrays({"w": np.zeros(2, np.float32)}, chunk_bytes=512)
    assert buffers.take(small.layout) is None
