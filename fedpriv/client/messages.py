"""What a silo streams back: result headers and update chunks, raw or compressed."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedpriv.v1 import fleet_pb2
from fedpriv.wire import Compression, TensorLayout, chunk_pieces, encode_chunks
from fedpriv.wire.frames import chunk_frame

__all__ = ["ClientStats", "ErrorFeedback", "compressed_messages", "result_messages"]


@dataclass(slots=True)
class ClientStats:
    """What a silo did in one run."""

    silo: str = ""
    trained: int = 0
    evaluated: int = 0
    rejected: int = 0
    declined: int = 0
    # Trained, but the coordinator had called the round off: nothing released.
    withheld: int = 0
    reconnects: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


def result_messages(
    header: fleet_pb2.ResultHeader,
    layout: TensorLayout | None,
    parameters: Mapping[str, npt.NDArray[Any]] | None,
    stats: ClientStats,
) -> Iterator[fleet_pb2.ResultMessage | bytes]:
    """The header, then `parameters`' bytes chunk by chunk (nothing more without a layout)."""
    yield fleet_pb2.ResultMessage(header=header)
    if layout is None or parameters is None:
        return
    for offset, length, pieces in chunk_pieces(layout, parameters):
        stats.bytes_sent += length
        yield chunk_frame(offset, pieces, length)  # the update's bytes, copied once


class ErrorFeedback:
    """What compression lost in earlier rounds, added to the next update (one per silo run)."""

    def __init__(self) -> None:
        self._residual: npt.NDArray[np.float32] | None = None
        self._key: tuple[str, int] = ("", 0)

    def residual(self, compression: Compression, size: int) -> npt.NDArray[np.float32]:
        """The residual for `size` float32 values (zeros when the setting or model changed)."""
        key = (compression.value, size)
        if self._residual is None or self._key != key:
            self._residual = np.zeros(size, np.float32)
            self._key = key
        return self._residual


def compressed_messages(
    header: fleet_pb2.ResultHeader,
    layout: TensorLayout,
    parameters: Mapping[str, npt.NDArray[Any]],
    base: npt.NDArray[np.uint8],
    compression: Compression,
    feedback: ErrorFeedback,
    stats: ClientStats,
) -> Iterator[fleet_pb2.ResultMessage | bytes]:
    """The update as compressed differences from `base`, chunk by chunk, with error feedback."""
    yield fleet_pb2.ResultMessage(header=header)
    residual = feedback.residual(compression, layout.payload_bytes // 4)
    for offset, data in encode_chunks(layout, parameters):
        first, count = offset // 4, len(data) // 4
        difference = np.frombuffer(data, dtype="<f4") - np.frombuffer(
            base, dtype="<f4", count=count, offset=offset
        )
        difference += residual[first : first + count]
        wire, decoded = compression.compress(difference)
        residual[first : first + count] = difference - decoded
        stats.bytes_sent += len(wire)
        yield chunk_frame(offset, (wire,), len(wire))
