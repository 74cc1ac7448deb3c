"""Hand-framed chunk messages parse like the generated code's bytes, and decode to views."""

from __future__ import annotations

import numpy as np
import pytest

from fedpriv.v1 import fleet_pb2, tensor_pb2
from fedpriv.wire import Model, chunk_pieces, encode_chunks
from fedpriv.wire.frames import (
    RawChunk,
    chunk_frame,
    decode_chunk_frame,
    parse_with_chunks,
    serialize,
)


@pytest.mark.parametrize("offset", [0, 1, 127, 128, 4 << 20, 2**40])
@pytest.mark.parametrize("length", [0, 1, 127, 128, 300_000, 2 << 20])
def test_frames_and_the_generated_serialisation_read_alike_both_ways(offset, length):
    data = np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8).tobytes()
    for message_type in (fleet_pb2.TaskMessage, fleet_pb2.ResultMessage):
        generated = message_type(
            chunk=tensor_pb2.TensorChunk(offset=offset, data=data)
        ).SerializeToString()
        frame = chunk_frame(offset, (data[: length // 2], memoryview(data)[length // 2 :]), length)
        parsed = message_type.FromString(frame)
        assert parsed.chunk.offset == offset and parsed.chunk.data == data
        assert parsed.chunk.padding == bytes(len(parsed.chunk.padding))
        for encoded in (frame, generated):
            decoded = decode_chunk_frame(encoded)
            assert decoded == RawChunk(offset, memoryview(data)) and bytes(decoded.data) == data


@pytest.mark.parametrize("offset", [0, 8, 1 << 20, 2**40])
@pytest.mark.parametrize("length", [8, 4096, 1 << 20])
def test_a_received_frame_s_data_is_aligned_for_numpy(offset, length):
    """The padding puts the data 8-byte aligned, so float32 views need no copy."""
    frame = chunk_frame(offset, (bytes(length),), length)
    assert (len(frame) - length) % 8 == 0
    received = bytes(bytearray(frame))  # a fresh object, as gRPC hands each message over
    decoded = decode_chunk_frame(received)
    assert decoded is not None
    assert np.frombuffer(decoded.data, np.float32).flags.aligned
    assert np.frombuffer(decoded.data, np.float64).flags.aligned


def test_anything_but_a_plain_chunk_goes_to_the_generated_parser():
    header = fleet_pb2.ResultMessage(header=fleet_pb2.ResultHeader(task_id="t", round=3))
    deserialize = parse_with_chunks(fleet_pb2.ResultMessage.FromString)
    assert deserialize(header.SerializeToString()) == header
    chunk = tensor_pb2.TensorChunk(offset=8, data=b"abc").SerializeToString()
    # Fields in the other order still decode by hand; an unknown field falls back.
    reordered = b"\x12" + bytes([len(chunk)]) + chunk[2:] + chunk[:2]
    assert deserialize(reordered) == RawChunk(8, memoryview(b"abc"))
    unknown = chunk + b"\x20\x01"  # TensorChunk field 4, which this version does not know
    framed = b"\x12" + bytes([len(unknown)]) + unknown
    assert decode_chunk_frame(framed) is None
    parsed = deserialize(framed)
    assert parsed.chunk.offset == 8 and parsed.chunk.data == b"abc"
    # One padding field is skipped by hand; a repeated one falls back.
    padded = b"\x1a\x01\x00" + chunk
    assert deserialize(b"\x12" + bytes([len(padded)]) + padded) == RawChunk(8, memoryview(b"abc"))
    twice = b"\x1a\x00" + padded
    framed = b"\x12" + bytes([len(twice)]) + twice
    assert decode_chunk_frame(framed) is None
    assert deserialize(framed).chunk.data == b"abc"
    # Truncated frames are not chunks (the generated parser then rejects them).
    assert decode_chunk_frame(b"\x12\x05\x08") is None
    assert decode_chunk_frame(b"\x12\x80") is None


def test_serialize_passes_frames_through():
    message = fleet_pb2.TaskMessage(chunk=tensor_pb2.TensorChunk(offset=1, data=b"x"))
    assert serialize(message) == message.SerializeToString()
    frame = chunk_frame(1, (b"x",), 1)
    assert serialize(frame) is frame


def test_chunk_pieces_join_to_the_encoded_chunks():
    arrays = {
        "a": np.arange(37, dtype=np.float32),
        "b": np.arange(10, dtype=np.float64).reshape(2, 5),
    }
    model = Model.from_arrays(arrays, chunk_bytes=64)
    joined = [(o, b"".join(p)) for o, _, p in chunk_pieces(model.layout, arrays)]
    assert joined == list(encode_chunks(model.layout, arrays))
    assert [(o, bytes(v)) for o, v in model.chunks()] == joined
