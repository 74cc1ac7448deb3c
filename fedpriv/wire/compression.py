"""Update compression on the wire: fp16, bf16, or int8 with one scale per chunk.

A compressed update travels in the global model's chunk grid (float32 models
only). Each chunk carries the *difference* from the global model's chunk,
compressed on its own, so the coordinator decompresses and folds chunk by
chunk exactly as it does uncompressed updates:

- ``fp16``: the difference as IEEE half floats (2 bytes per value);
- ``bf16``: the difference as bfloat16 (2 bytes per value, float32's range);
- ``int8``: a little-endian float32 scale, then the difference divided by the
  scale and rounded to int8 (1 byte per value; scale = max |difference| / 127).

Silos keep what rounding lost and add it to the next round's difference
(error feedback, Seide et al. 2014; Karimireddy et al. 2019), so the errors do
not accumulate in the global model.
"""

from __future__ import annotations

import enum

import numpy as np
import numpy.typing as npt

from fedpriv.v1 import fleet_pb2
from fedpriv.wire.codec import bfloat16_to_float32, float32_to_bfloat16

__all__ = ["Compression", "declared_compression"]

_SCALE_BYTES = 4


class Compression(enum.Enum):
    """How update chunks are compressed (the coordinator's ``rounds.update_compression``)."""

    NONE = "none"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"

    @classmethod
    def from_proto(cls, value: int) -> Compression:
        """The codec a ``fedpriv.v1.Compression`` value names.

        Example:
            >>> Compression.from_proto(fleet_pb2.COMPRESSION_INT8)
            <Compression.INT8: 'int8'>

        Raises:
            ValueError: `value` names no codec this side knows (a newer protocol).
        """
        for codec, number in _PROTO.items():
            if number == value:
                return codec
        raise ValueError(f"unknown compression {value}")

    def to_proto(self) -> fleet_pb2.Compression:
        """The ``fedpriv.v1.Compression`` value of this codec."""
        return _PROTO[self]

    @classmethod
    def from_name(cls, name: str) -> Compression:
        """The codec of a lower-case name (``ResultHeader.compression``; "" is NONE).

        Raises:
            ValueError: No codec has that name.
        """
        try:
            return cls(name or "none")
        except ValueError:
            raise ValueError(f"unknown compression {name[:64]!r}") from None

    def wire_length(self, chunk_bytes: int) -> int:
        """Bytes on the wire for a float32 chunk of `chunk_bytes` bytes.

        Example:
            >>> [c.wire_length(1024) for c in Compression]
            [1024, 512, 512, 260]
        """
        values = chunk_bytes // 4
        if self is Compression.NONE:
            return chunk_bytes
        if self is Compression.INT8:
            return _SCALE_BYTES + values
        return 2 * values

    def compress(
        self, difference: npt.NDArray[np.float32]
    ) -> tuple[bytes, npt.NDArray[np.float32]]:
        """Compress one chunk's difference; return the wire bytes and what the receiver decodes.

        Example:
            >>> data, decoded = Compression.INT8.compress(np.array([0.5, -1.0, 0.25], np.float32))
            >>> len(data), [round(float(v), 3) for v in decoded]
            (7, [0.504, -1.0, 0.252])
        """
        values = np.ascontiguousarray(difference, dtype="<f4")
        if self is Compression.NONE:
            return values.tobytes(), values
        if self is Compression.FP16:
            wire16 = values.astype("<f2")
            return wire16.tobytes(), wire16.astype(np.float32)
        if self is Compression.BF16:
            bits = float32_to_bfloat16(values)
            return bits.tobytes(), bfloat16_to_float32(bits)
        largest = float(np.max(np.abs(values))) if values.size else 0.0
        scale = np.float32(largest / 127.0 if largest > 0 else 1.0)
        quantised = np.clip(np.rint(values / scale), -127, 127).astype(np.int8)
        data = np.array([scale], dtype="<f4").tobytes() + quantised.tobytes()
        return data, quantised.astype(np.float32) * scale

    def decompress(self, data: bytes | memoryview, values: int) -> npt.NDArray[np.float32]:
        """Decode one chunk of `values` float32 differences.

        Raises:
            ValueError: `data` has the wrong length for `values` values.
        """
        expected = self.wire_length(4 * values)
        if len(data) != expected:
            raise ValueError(f"{len(data)} bytes, expected {expected} for {values} values")
        if self is Compression.NONE:
            return np.frombuffer(data, dtype="<f4").copy()
        if self is Compression.FP16:
            return np.frombuffer(data, dtype="<f2").astype(np.float32)
        if self is Compression.BF16:
            return bfloat16_to_float32(np.frombuffer(data, dtype="<u2"))
        scale = np.frombuffer(data, dtype="<f4", count=1)[0]
        quantised = np.frombuffer(data, dtype=np.int8, offset=_SCALE_BYTES)
        decoded: npt.NDArray[np.float32] = quantised.astype(np.float32) * scale
        return decoded


_PROTO: dict[Compression, fleet_pb2.Compression] = {
    Compression.NONE: fleet_pb2.COMPRESSION_NONE,
    Compression.FP16: fleet_pb2.COMPRESSION_FP16,
    Compression.BF16: fleet_pb2.COMPRESSION_BF16,
    Compression.INT8: fleet_pb2.COMPRESSION_INT8,
}


def declared_compression(header: fleet_pb2.ResultHeader) -> tuple[Compression, list[str]]:
    """The compression a result header declares, and what is wrong with the declaration.

    ``update_compression`` (field 9) says it; without it, the deprecated name in
    ``compression`` (field 8) does. A value this side does not know, or two
    fields that disagree, is a problem (then NONE is returned beside it).

    Example:
        >>> header = fleet_pb2.ResultHeader(
        ...     compression="int8", update_compression=fleet_pb2.COMPRESSION_INT8
        ... )
        >>> declared_compression(header)
        (<Compression.INT8: 'int8'>, [])
        >>> declared_compression(fleet_pb2.ResultHeader(compression="fp16"))
        (<Compression.FP16: 'fp16'>, [])
    """
    try:
        legacy = Compression.from_name(header.compression)
    except ValueError as err:
        legacy_problem: str | None = f"compression (field 8): {err}"
        legacy = Compression.NONE
    else:
        legacy_problem = None
    if not header.HasField("update_compression"):
        return legacy, [] if legacy_problem is None else [legacy_problem]
    try:
        typed = Compression.from_proto(header.update_compression)
    except ValueError as err:
        return Compression.NONE, [f"update_compression: {err}"]
    if header.compression and (legacy_problem is not None or legacy is not typed):
        return Compression.NONE, [
            f"update_compression {typed.value!r} and compression {header.compression[:64]!r} "
            "(field 8) disagree"
        ]
    return typed, []
