"""The coordinator's streaming sum of masked updates in Z/2^32."""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["RingSum"]


class RingSum:
    """Streaming sum of masked updates in Z/2^32; an :class:`~fedpriv.strategy.Aggregator`.

    Chunks hold int32 elements whose bits are ring elements; weight +1 adds a
    chunk and -1 removes it again (an abandoned upload).
    """

    def __init__(self, size: int, *, chunk_bytes: int) -> None:
        self.total = np.zeros(size, dtype=np.uint32)
        self._chunk_elements = chunk_bytes // 4
        self._locks = [threading.Lock() for _ in range(max(1, -(-size // self._chunk_elements)))]

    def fold(self, offset: int, chunk: bytes | memoryview, *, weight: float) -> None:
        """Add (weight 1) or subtract (weight -1) a chunk, modulo 2^32."""
        if weight not in (1.0, -1.0):
            raise ValueError(f"a ring sum folds with weight 1 or -1, got {weight}")
        first = offset // 4
        values = np.frombuffer(chunk, dtype="<u4")
        with self._locks[first // self._chunk_elements]:
            target = self.total[first : first + values.size]
            if weight > 0:
                target += values
            else:
                target -= values
