"""Encode arrays into chunk streams and decode them back, copying as little as possible.

Sending copies each byte once (into the chunk that protobuf carries); receiving
copies each byte once (into the payload buffer). Decoded arrays are views on
that buffer, except bfloat16, which numpy lacks and which is widened to float32.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import numpy.typing as npt

from fedpriv.v1 import tensor_pb2
from fedpriv.wire.layout import ALIGN_BYTES, MAX_CHUNK_BYTES, DType, TensorLayout, TensorSpec

__all__ = [
    "PayloadAssembler",
    "arrays_from_payload",
    "bfloat16_to_float32",
    "encode_chunks",
    "float32_to_bfloat16",
    "layout_from_proto",
    "specs_from_arrays",
]

_PADDING = bytes(ALIGN_BYTES)
# Caps on what an unverified header may ask a receiver to allocate or parse.
MAX_TENSORS = 100_000
MAX_NAME_BYTES = 1024
MAX_DIMS = 32


def specs_from_arrays(arrays: Mapping[str, npt.NDArray[np.generic]]) -> list[TensorSpec]:
    """Describe `arrays` in order, mapping each numpy dtype to its wire type.

    Raises:
        TypeError: An array has a dtype that cannot be sent.
    """
    return [
        TensorSpec(name=name, dtype=DType.from_numpy(a.dtype), shape=tuple(int(d) for d in a.shape))
        for name, a in arrays.items()
    ]


def float32_to_bfloat16(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """Round float32 values to bfloat16 bit patterns (round half to even, NaN kept NaN)."""
    bits = np.ascontiguousarray(values, dtype="<f4").view("<u4")
    rounding = ((bits >> 16) & 1) + 0x7FFF
    rounded: npt.NDArray[np.uint16] = ((bits + rounding) >> 16).astype("<u2")
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype("<u2")
    return rounded


def bfloat16_to_float32(bits: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
    """Widen bfloat16 bit patterns to float32 (exact)."""
    return (bits.astype("<u4") << 16).view("<f4")


def _wire_bytes(spec: TensorSpec, array: npt.NDArray[np.generic]) -> memoryview:
    """Return `array` as the little-endian bytes of `spec`, casting only if needed."""
    if tuple(array.shape) != spec.shape:
        raise ValueError(f"{spec.name}: shape {tuple(array.shape)} != expected {spec.shape}")
    if spec.dtype is DType.BFLOAT16:
        if array.dtype == np.dtype("<u2"):
            wire = np.ascontiguousarray(array)
        else:
            wire = float32_to_bfloat16(np.asarray(array, dtype="<f4"))
    else:
        wire = np.ascontiguousarray(array, dtype=spec.dtype.storage)
    flat: npt.NDArray[np.uint8] = wire.reshape(-1).view(np.uint8)
    return flat.data


def chunk_pieces(
    layout: TensorLayout, arrays: Mapping[str, npt.NDArray[np.generic]]
) -> Iterator[tuple[int, int, list[bytes | memoryview]]]:
    """Yield ``(offset, length, pieces)``: each chunk as views of `arrays` (and padding).

    Nothing is copied unless an array must be cast to the layout's dtype or made
    contiguous; joining the pieces gives the chunk's bytes.

    Raises:
        KeyError: An array named in the layout is missing.
        ValueError: An array's shape differs from the layout.
    """
    views = [_wire_bytes(spec, arrays[spec.name]) for spec in layout.specs]
    for index in range(layout.num_chunks):
        offset, length = layout.chunk_range(index)
        pieces: list[bytes | memoryview] = []
        position = offset
        for segment in layout.segments(offset, length):
            if segment.payload_offset > position:
                pieces.append(_PADDING[: segment.payload_offset - position])
            itemsize = layout.specs[segment.index].dtype.itemsize
            start = segment.first_element * itemsize
            piece = views[segment.index][start : start + segment.count * itemsize]
            pieces.append(piece)
            position = segment.payload_offset + len(piece)
        if position < offset + length:
            pieces.append(bytes(offset + length - position))
        yield offset, length, pieces


def encode_chunks(
    layout: TensorLayout, arrays: Mapping[str, npt.NDArray[np.generic]]
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, data)`` chunks of the payload of `arrays` laid out as `layout`.

    Arrays are cast to the layout's dtypes when they differ (float32 to bfloat16
    rounds half to even). Each payload byte is copied once, into its chunk.

    Raises:
        KeyError: An array named in the layout is missing.
        ValueError: An array's shape differs from the layout.
    """
    for offset, _, pieces in chunk_pieces(layout, arrays):
        yield (
            offset,
            pieces[0].tobytes()
            if len(pieces) == 1 and isinstance(pieces[0], memoryview)
            else b"".join(pieces),
        )


def layout_from_proto(header: tensor_pb2.TensorHeader) -> tuple[TensorLayout | None, list[str]]:
    """Check an unverified header and build its layout.

    Returns:
        ``(layout, [])`` when the header is well formed, else ``(None, problems)``
        listing every problem found.
    """
    problems: list[str] = []
    if len(header.tensors) > MAX_TENSORS:
        return None, [f"header lists {len(header.tensors)} tensors; at most {MAX_TENSORS} allowed"]
    if not 0 < header.chunk_bytes <= MAX_CHUNK_BYTES or header.chunk_bytes % ALIGN_BYTES:
        problems.append(
            f"chunk_bytes {header.chunk_bytes} must be a positive multiple of {ALIGN_BYTES} "
            f"no larger than {MAX_CHUNK_BYTES}"
        )
    specs = []
    for position, raw in enumerate(header.tensors):
        label = raw.name if raw.name else f"tensor #{position}"
        if not raw.name or len(raw.name.encode()) > MAX_NAME_BYTES:
            problems.append(f"{label}: name must be 1 to {MAX_NAME_BYTES} bytes")
        try:
            dtype = DType(raw.dtype)
        except ValueError:
            problems.append(f"{label}: unknown dtype {raw.dtype}")
            continue
        if len(raw.shape) > MAX_DIMS:
            problems.append(f"{label}: {len(raw.shape)} dimensions; at most {MAX_DIMS} allowed")
            continue
        specs.append(TensorSpec(name=raw.name, dtype=dtype, shape=tuple(int(d) for d in raw.shape)))
    if problems:
        return None, problems
    try:
        layout = TensorLayout.from_specs(specs, chunk_bytes=header.chunk_bytes)
    except ValueError as err:
        return None, [str(err)]
    if layout.payload_bytes != header.payload_bytes:
        return None, [
            f"payload_bytes {header.payload_bytes} != {layout.payload_bytes} implied by the tensors"
        ]
    return layout, []


class PayloadAssembler:
    """Collect an in-order chunk stream into one preallocated buffer.

    Example:
        >>> layout = TensorLayout.from_specs(
        ...     [TensorSpec(name="w", dtype=DType.FLOAT32, shape=(2,))], chunk_bytes=8)
        >>> assembler = PayloadAssembler(layout)
        >>> for offset, data in encode_chunks(layout, {"w": np.array([1, 2], np.float32)}):
        ...     assembler.add(offset, data)
        >>> arrays_from_payload(layout, assembler.finish())["w"].tolist()
        [1.0, 2.0]
    """

    def __init__(
        self, layout: TensorLayout, *, buffer: npt.NDArray[np.uint8] | None = None
    ) -> None:
        """Fill `buffer` (``layout.payload_bytes`` of uint8, reused), or a new buffer."""
        self.layout = layout
        if buffer is not None and (
            buffer.dtype != np.uint8 or buffer.nbytes != layout.payload_bytes
        ):
            raise ValueError(
                f"a reused buffer must be {layout.payload_bytes} uint8 bytes, not {buffer.nbytes}"
            )
        self._buffer = buffer if buffer is not None else np.empty(layout.payload_bytes, np.uint8)
        self._received = 0

    def add(self, offset: int, data: bytes | memoryview) -> None:
        """Copy one chunk into place.

        Raises:
            ValueError: The chunk is out of order or of the wrong length.
        """
        expected_offset, expected_length = self.layout.chunk_range(
            offset // self.layout.chunk_bytes
        )
        if offset != self._received or offset != expected_offset or len(data) != expected_length:
            raise ValueError(
                f"chunk at offset {offset} with {len(data)} bytes does not follow "
                f"{self._received} of {self.layout.payload_bytes} received bytes"
            )
        self._buffer[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)
        self._received += len(data)

    @property
    def complete(self) -> bool:
        """Whether every payload byte has arrived."""
        return self._received == self.layout.payload_bytes

    def finish(self) -> npt.NDArray[np.uint8]:
        """Return the payload buffer.

        Raises:
            ValueError: Chunks are missing.
        """
        if not self.complete:
            raise ValueError(
                f"stream ended after {self._received} of {self.layout.payload_bytes} payload bytes"
            )
        return self._buffer


def arrays_from_payload(
    layout: TensorLayout, payload: npt.NDArray[np.uint8] | bytes | memoryview
) -> dict[str, npt.NDArray[np.generic]]:
    """View each tensor of `payload` as a numpy array (bfloat16 widened to float32)."""
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    for spec, offset in zip(layout.specs, layout.offsets, strict=True):
        flat = np.frombuffer(payload, dtype=spec.dtype.storage, count=spec.numel, offset=offset)
        if spec.dtype is DType.BFLOAT16:
            flat = bfloat16_to_float32(flat)
        arrays[spec.name] = flat.reshape(spec.shape)
    return arrays
