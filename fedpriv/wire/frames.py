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

A frame carries ``TensorChunk.padding`` before its data, sized so that the data
starts a multiple of 8 bytes into the message. CPython (64-bit) starts a
``bytes`` object's contents 16-byte aligned, so the receiver's numpy views of
the data are aligned. numpy reads unaligned numbers through a copy: checking,
spooling and folding chunks ran 1.2-1.8x slower unaligned (docs/performance.md).
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
_PADDING_TAG = 0x1A  # TensorChunk.padding: field 3, length-delimited
_DATA_ALIGN = 8  # where a frame's data starts, in bytes from the frame's start


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


def _head(offset_field: bytes, padding: int | None, data_field: bytes, length: int) -> bytes:
    padding_field = (
        b"" if padding is None else bytes([_PADDING_TAG]) + _varint(padding) + bytes(padding)
    )
    inner = offset_field + padding_field + data_field
    return bytes([_CHUNK_TAG]) + _varint(len(inner) + length) + inner


def chunk_frame(offset: int, pieces: Sequence[bytes | memoryview], length: int) -> bytes:
    """``{chunk: {offset, padding, data}}`` with ``data`` the concatenation of `pieces`.

    `length` is the data's length in bytes. ``padding`` (zero bytes, left out
    when not needed) makes the data start a multiple of 8 bytes into the frame.
    The generated parser reads the same ``offset`` and ``data``.
    """
    # Like the generated code, zero and empty fields are left out.
    offset_field = bytes([_OFFSET_TAG]) + _varint(offset) if offset else b""
    data_field = bytes([_DATA_TAG]) + _varint(length) if length else b""
    head = _head(offset_field, None, data_field, length)
    # A padding field takes at least 2 bytes, so one of 8 consecutive sizes fits.
    padding = 0
    while length and len(head) % _DATA_ALIGN:
        head = _head(offset_field, padding, data_field, length)
        padding += 1
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
    padded = False
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
        elif tag == _PADDING_TAG and not padded:
            read = _read_varint(data, position, end)
            if read is None or read[1] + read[0] > end:
                return None
            padded = True
            position = read[1] + read[0]
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
