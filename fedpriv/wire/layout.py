"""Tensor specs and the payload layout shared by every tensor stream.

A payload is the concatenation of tensors in header order, each starting at an
8-byte aligned offset. Because every element size divides 8 and every chunk
size is a multiple of 8, no element straddles a chunk boundary.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedpriv.v1 import tensor_pb2

__all__ = [
    "ALIGN_BYTES",
    "DEFAULT_CHUNK_BYTES",
    "MAX_CHUNK_BYTES",
    "DType",
    "Segment",
    "TensorLayout",
    "TensorSpec",
]

ALIGN_BYTES = 8
# Each chunk is one gRPC message, and each message costs both ends a fixed amount of
# work. At P = 50M, N = 8 (docs/performance.md, "Chunk size"), two sweeps of 1, 2 and
# 4 MiB chunks took 3.97-4.08, 3.23-3.34 and 2.82-3.46 s a round in plain text and
# 5.69-6.04, 5.20-5.46 and 5.18-5.44 s with mTLS, while coordinator peak RSS rose from
# 314 MB to 345 and 408 MB (more bytes in flight per stream). 2 MiB takes most of the
# time saved for a third of the memory; the protocol allows up to 4 MiB.
DEFAULT_CHUNK_BYTES = 2 << 20
MAX_CHUNK_BYTES = 4 << 20


class DType(enum.Enum):
    """Element types that may cross the wire (values equal the proto enum)."""

    FLOAT32 = tensor_pb2.DTYPE_FLOAT32
    FLOAT16 = tensor_pb2.DTYPE_FLOAT16
    BFLOAT16 = tensor_pb2.DTYPE_BFLOAT16
    FLOAT64 = tensor_pb2.DTYPE_FLOAT64
    INT64 = tensor_pb2.DTYPE_INT64
    INT32 = tensor_pb2.DTYPE_INT32
    INT8 = tensor_pb2.DTYPE_INT8
    UINT8 = tensor_pb2.DTYPE_UINT8
    BOOL = tensor_pb2.DTYPE_BOOL

    @property
    def storage(self) -> np.dtype[np.generic]:
        """Little-endian numpy dtype of the bytes on the wire (bfloat16 as uint16)."""
        return np.dtype(_STORAGE[self])

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return self.storage.itemsize

    @property
    def is_floating(self) -> bool:
        """Whether the type holds floating-point values."""
        return self in (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16, DType.FLOAT64)

    @classmethod
    def from_numpy(cls, dtype: np.dtype[np.generic]) -> DType:
        """Map a numpy dtype to its wire type.

        Raises:
            TypeError: The dtype has no wire representation.
        """
        for member, name in _STORAGE.items():
            if member is not DType.BFLOAT16 and np.dtype(name) == dtype.newbyteorder("<"):
                return member
        raise TypeError(f"numpy dtype {dtype} cannot be sent; use one of {_wire_names()}")


_STORAGE: dict[DType, str] = {
    DType.FLOAT32: "<f4",
    DType.FLOAT16: "<f2",
    DType.BFLOAT16: "<u2",
    DType.FLOAT64: "<f8",
    DType.INT64: "<i8",
    DType.INT32: "<i4",
    DType.INT8: "i1",
    DType.UINT8: "u1",
    DType.BOOL: "?",
}


def _wire_names() -> str:
    return ", ".join(m.name.lower() for m in DType)


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorSpec:
    """Name, element type and shape of one tensor."""

    name: str
    dtype: DType
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of elements (1 for a 0-d tensor)."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor on the wire, without alignment padding."""
        return self.numel * self.dtype.itemsize

    def describe(self) -> str:
        """Short text such as ``float32(512, 64)`` for error messages."""
        return f"{self.dtype.name.lower()}{self.shape}"


@dataclass(frozen=True, slots=True)
class Segment:
    """The part of one tensor that a byte range of the payload covers."""

    index: int
    first_element: int
    count: int
    payload_offset: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorLayout:
    """Where each tensor lives in the payload and how the payload is chunked.

    Example:
        >>> layout = TensorLayout.from_specs(
        ...     [TensorSpec(name="a", dtype=DType.FLOAT16, shape=(3,)),
        ...      TensorSpec(name="b", dtype=DType.FLOAT32, shape=(2,))], chunk_bytes=8)
        >>> layout.offsets, layout.payload_bytes, layout.num_chunks
        ((0, 8), 16, 2)
    """

    specs: tuple[TensorSpec, ...]
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    offsets: tuple[int, ...] = field(default=())
    payload_bytes: int = 0

    @classmethod
    def from_specs(
        cls, specs: Sequence[TensorSpec], *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> TensorLayout:
        """Compute aligned offsets for `specs`.

        Raises:
            ValueError: `chunk_bytes` is not a positive multiple of 8 up to 4 MiB,
                or two tensors share a name.
        """
        if chunk_bytes <= 0 or chunk_bytes % ALIGN_BYTES or chunk_bytes > MAX_CHUNK_BYTES:
            raise ValueError(
                f"chunk_bytes={chunk_bytes} must be a positive multiple of {ALIGN_BYTES} "
                f"no larger than {MAX_CHUNK_BYTES}"
            )
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"tensor names must be unique; repeated: {dupes}")
        offsets = []
        position = 0
        for spec in specs:
            position = _align(position)
            offsets.append(position)
            position += spec.nbytes
        return cls(
            specs=tuple(specs),
            chunk_bytes=chunk_bytes,
            offsets=tuple(offsets),
            payload_bytes=position,
        )

    @property
    def num_chunks(self) -> int:
        """Number of chunks the payload is cut into (0 for an empty payload)."""
        return -(-self.payload_bytes // self.chunk_bytes)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """Return (offset, length) of chunk `index`."""
        start = index * self.chunk_bytes
        return start, min(self.chunk_bytes, self.payload_bytes - start)

    def segments(self, offset: int, length: int) -> Iterator[Segment]:
        """Yield the tensor parts that payload bytes [offset, offset+length) cover."""
        end = offset + length
        for index, (spec, start) in enumerate(zip(self.specs, self.offsets, strict=True)):
            stop = start + spec.nbytes
            if stop <= offset or spec.nbytes == 0:
                continue
            if start >= end:
                break
            lo = max(start, offset)
            hi = min(stop, end)
            size = spec.dtype.itemsize
            yield Segment(index, (lo - start) // size, (hi - lo) // size, lo)

    def to_proto(self) -> tensor_pb2.TensorHeader:
        """Build the wire header."""
        return tensor_pb2.TensorHeader(
            tensors=[
                tensor_pb2.TensorSpec(name=s.name, dtype=s.dtype.value, shape=list(s.shape))
                for s in self.specs
            ],
            payload_bytes=self.payload_bytes,
            chunk_bytes=self.chunk_bytes,
        )


def _align(position: int) -> int:
    return -(-position // ALIGN_BYTES) * ALIGN_BYTES
