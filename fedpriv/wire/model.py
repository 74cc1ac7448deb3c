"""A model as it travels: a layout plus one contiguous payload buffer."""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedpriv.wire.codec import arrays_from_payload, encode_chunks, specs_from_arrays
from fedpriv.wire.layout import DEFAULT_CHUNK_BYTES, TensorLayout

__all__ = ["Model"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Model:
    """Tensors laid out in one payload buffer, ready to stream without re-encoding.

    Example:
        >>> model = Model.from_arrays({"w": np.arange(3, dtype=np.float32)})
        >>> model.arrays()["w"].tolist(), model.layout.payload_bytes
        ([0.0, 1.0, 2.0], 12)
    """

    layout: TensorLayout
    payload: npt.NDArray[np.uint8]

    @classmethod
    def from_arrays(
        cls,
        arrays: Mapping[str, npt.NDArray[np.generic]],
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        layout: TensorLayout | None = None,
    ) -> Model:
        """Lay `arrays` out in a new payload (one copy); specs are inferred unless given."""
        if layout is None:
            layout = TensorLayout.from_specs(specs_from_arrays(arrays), chunk_bytes=chunk_bytes)
        payload = np.empty(layout.payload_bytes, dtype=np.uint8)
        for offset, data in encode_chunks(layout, arrays):
            payload[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)
        return cls(layout=layout, payload=payload)

    def arrays(self) -> dict[str, npt.NDArray[np.generic]]:
        """Views of the tensors (bfloat16 widened to float32)."""
        return arrays_from_payload(self.layout, self.payload)

    def chunks(self) -> Iterator[tuple[int, memoryview]]:
        """Yield ``(offset, view)`` for every chunk, without copying."""
        view = self.payload.data
        for index in range(self.layout.num_chunks):
            offset, length = self.layout.chunk_range(index)
            yield offset, view[offset : offset + length]

    def evict(self, offset: int, length: int) -> None:
        """Unmap bytes ``[offset, offset + length)`` from the process when the payload maps a file.

        The data does not change: the pages stay in the kernel's page cache and
        the next read maps them in again. A model served from a file this way
        costs the process the chunks being read, not its whole size. A no-op for
        a payload in ordinary memory.
        """
        mapping = self.payload.base
        if isinstance(mapping, memoryview):  # what np.frombuffer keeps of an mmap
            mapping = mapping.obj
        if not isinstance(mapping, mmap.mmap) or length <= 0:
            return
        # Where the payload starts in the mapping (a checkpoint's header comes first).
        start = self.payload.ctypes.data - np.frombuffer(mapping, np.uint8, count=1).ctypes.data
        first = (start + offset) // mmap.PAGESIZE * mmap.PAGESIZE
        last = min(start + offset + length, len(mapping))
        if last > first:
            mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
