"""Chunk messages framed by hand: protobuf's bytes on the wire, without protobuf's copies.

``TaskMessage`` and ``ResultMessage`` both carry ``TensorChunk chunk = 2``, and a
``TensorChunk`` is ``uint64 offset = 1; bytes data = 2``. Through the generated
code a chunk's payload is copied four times on the way out (into a ``bytes``,
into the message, into the serialised string, into gRPC) and three times on
the way in. By hand, the payload is copied once into the frame on the way out,
and the decoder returns a view into the received message on the way in.

The frames are ordinary protobuf encoding, so peers that use generated code
(in any language) read and write them unchanged. Anything the decoder does
not recognise as a plain chunk message goes to the generated parser.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

__all__ = [
    "RawChunk",
    "chunk_frame",
    "chunk_of",
    "decode_chunk_frame",
    "parse_with_chunks",
    "serialize",
]

_CHUNK_TAG = 0x12  # field 2, length-delimited: the `chunk` of both stream messages
_OFFSET_TAG = 0x08  # TensorChunk.offset: field 1, varint
_DATA_TAG = 0x12  # TensorChunk.data: field 2, length-delimited


class RawChunk(NamedTuple):
    """A decoded chunk message: its offset and a view of its data (no copy)."""

    offset: int
    data: memoryview


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes | memoryview, position: int, end: int) -> tuple[int, int] | None:
    value = shift = 0
    while position < end and shift < 64:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    return None


def chunk_frame(offset: int, pieces: Sequence[bytes | memoryview], length: int) -> bytes:
    """``{chunk: {offset, data}}`` with ``data`` the concatenation of `pieces` (`length` bytes).

    The bytes equal the generated code's serialisation of the same message.
    """
    # Like the generated code, zero and empty fields are left out.
    inner = (_OFFSET_TAG.to_bytes(1, "little") + _varint(offset) if offset else b"") + (
        _DATA_TAG.to_bytes(1, "little") + _varint(length) if length else b""
    )
    head = _CHUNK_TAG.to_bytes(1, "little") + _varint(len(inner) + length) + inner
    return b"".join([head, *pieces])


def decode_chunk_frame(data: bytes) -> RawChunk | None:
    """The chunk in `data` when it is exactly one plain chunk message, else None."""
    end = len(data)
    if end < 2 or data[0] != _CHUNK_TAG:
        return None
    read = _read_varint(data, 1, end)
    if read is None or read[1] + read[0] != end:
        return None
    position = read[1]
    offset: int | None = None
    payload: memoryview | None = None
    while position < end:
        tag = data[position]
        position += 1
        if tag == _OFFSET_TAG and offset is None:
            read = _read_varint(data, position, end)
            if read is None:
                return None
            offset, position = read
        elif tag == _DATA_TAG and payload is None:
            read = _read_varint(data, position, end)
            if read is None or read[1] + read[0] > end:
                return None
            length, position = read
            payload = memoryview(data)[position : position + length]
            position += length
        else:  # unknown or repeated fields: the generated parser's semantics apply
            return None
    return RawChunk(offset or 0, payload if payload is not None else memoryview(b""))


def parse_with_chunks(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A gRPC deserializer: chunk messages as :class:`RawChunk`, the rest through `parse`."""

    def deserialize(data: bytes) -> Any:
        chunk = decode_chunk_frame(data)
        return chunk if chunk is not None else parse(data)

    return deserialize


def chunk_of(message: Any) -> tuple[int, bytes | memoryview] | None:
    """``(offset, data)`` of a stream message from :func:`parse_with_chunks`; None if no chunk."""
    if isinstance(message, RawChunk):  # a view into the received message
        return message.offset, message.data
    if message.WhichOneof("part") == "chunk":
        return message.chunk.offset, message.chunk.data
    return None


def serialize(message: Any) -> bytes:
    """A gRPC serializer: frames (``bytes``) pass through, messages are serialised."""
    if isinstance(message, bytes):
        return message
    return bytes(message.SerializeToString())
