"""Model-sized payloads recycled from round to round instead of freshly allocated."""

from __future__ import annotations

import collections
import sys

import numpy as np
import numpy.typing as npt

__all__ = ["RecycledPayloads"]


class RecycledPayloads:
    """Model-sized payloads recycled from round to round.

    A sum's payload becomes the next model's. One that nothing else holds any
    more (an old global model) becomes a later round's sum: a fresh
    model-sized buffer costs the kernel a zeroed page per 4 KiB (0.7 s for
    200 MB measured here), a recycled one a memset.
    """

    def __init__(self) -> None:
        self._issued: collections.deque[npt.NDArray[np.uint8]] = collections.deque(maxlen=8)

    def take(self, size: int) -> npt.NDArray[np.uint8] | None:
        """One issued payload of `size` bytes that nothing else holds, or None.

        The others that nothing holds are forgotten (and so freed).

        Example:
            >>> pool = RecycledPayloads()
            >>> payload = np.zeros(8, np.uint8)
            >>> pool.issue(payload)
            >>> pool.take(8) is None  # `payload` is still held here
            True
            >>> address = payload.ctypes.data
            >>> del payload
            >>> pool.take(8).ctypes.data == address
            True
        """
        found = None
        candidates = list(self._issued)
        self._issued.clear()
        for payload in candidates:
            # References: `candidates`, `payload` here and getrefcount's argument.
            if sys.getrefcount(payload) > 3:
                self._issued.append(payload)
            elif found is None and payload.nbytes == size:
                found = payload
        return found

    def issue(self, payload: npt.NDArray[np.uint8]) -> None:
        """Remember `payload` for reuse once nothing else holds it."""
        self._issued.append(payload)
