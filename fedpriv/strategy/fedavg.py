"""Weighted federated averaging, folded chunk by chunk (McMahan et al., 2017)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from fedpriv._types import Scalar
from fedpriv.strategy.buffers import RecycledPayloads
from fedpriv.strategy.protocol import UpdateSum
from fedpriv.wire import DType, Model, TensorLayout, bfloat16_to_float32, float32_to_bfloat16

__all__ = ["FedAvg", "FedAvgAggregator"]


def _accumulator_dtype(dtype: DType) -> np.dtype[np.floating]:
    # float32 sums of a few hundred weighted float32 updates lose < 1e-5 relative;
    # a float64 accumulator would double the coordinator's memory for nothing.
    if dtype in (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


class FedAvgAggregator:
    """Running weighted sum of updates; memory is one model-sized buffer.

    float32 and float64 tensors are summed in place inside the buffer that
    becomes the next model's payload, so finalizing allocates nothing more.
    Narrower or integer tensors get a float32/float64 accumulator of their own.
    """

    def __init__(
        self, layout: TensorLayout, *, payload: npt.NDArray[np.uint8] | None = None
    ) -> None:
        """Sum into `payload` (recycled, ``layout.payload_bytes``; zeroed here) or a new buffer."""
        self._layout = layout
        if payload is not None and payload.nbytes == layout.payload_bytes:
            payload.fill(0)  # resident pages: a memset, not a page fault per 4 KiB
            self._payload = payload
        else:
            self._payload = np.zeros(layout.payload_bytes, dtype=np.uint8)
        self._sums: list[npt.NDArray[np.floating] | None] = []
        self._in_place: list[bool] = []
        for spec, offset in zip(layout.specs, layout.offsets, strict=True):
            dtype = _accumulator_dtype(spec.dtype)
            in_place = dtype == spec.dtype.storage
            self._in_place.append(in_place)
            self._sums.append(
                np.frombuffer(self._payload, dtype=dtype, count=spec.numel, offset=offset)
                if in_place
                else np.zeros(spec.numel, dtype=dtype)
            )
        # Chunks never share bytes, so one lock per chunk lets different chunks fold in parallel.
        self._locks = [threading.Lock() for _ in range(max(layout.num_chunks, 1))]
        # Per aggregator, so they go with the round: RPC threads come and go.
        self._local = threading.local()

    def _scratch(self, dtype: np.dtype[np.floating], count: int) -> npt.NDArray[np.floating]:
        buffers: dict[np.dtype[np.floating], npt.NDArray[np.floating]] = getattr(
            self._local, "buffers", {}
        )
        self._local.buffers = buffers
        buffer = buffers.get(dtype)
        if buffer is None or buffer.size < count:
            buffer = buffers[dtype] = np.empty(max(count, self._layout.chunk_bytes // 4), dtype)
        return buffer[:count]

    def fold(self, offset: int, chunk: bytes | memoryview, *, weight: float) -> None:
        """Add ``weight * chunk`` into the running sums (see :class:`Aggregator`)."""
        # Overflow is not an error here: the coordinator checks the model is finite
        # before it commits, whatever the process's warning filters say.
        with self._locks[offset // self._layout.chunk_bytes], np.errstate(over="ignore"):
            for segment in self._layout.segments(offset, len(chunk)):
                spec = self._layout.specs[segment.index]
                values = np.frombuffer(
                    chunk,
                    dtype=spec.dtype.storage,
                    count=segment.count,
                    offset=segment.payload_offset - offset,
                )
                if spec.dtype is DType.BFLOAT16:
                    values = bfloat16_to_float32(values)
                total = self._sums[segment.index]
                if total is None:
                    raise RuntimeError("fold after finalize")
                target = total[segment.first_element : segment.first_element + segment.count]
                if weight == 1.0:
                    target += values
                else:
                    # Scale into a per-thread scratch buffer: no allocation per chunk, and
                    # the chunk stays in cache between the multiply and the add.
                    scratch = self._scratch(total.dtype, segment.count)
                    np.multiply(values, total.dtype.type(weight), out=scratch)
                    target += scratch

    @property
    def payload(self) -> npt.NDArray[np.uint8]:
        """The buffer the float32/float64 sums live in (the next model's payload)."""
        return self._payload

    def update_sum(self, total_weight: float, *, contributors: int) -> UpdateSum:
        """Hand the running sums over as an :class:`UpdateSum`; no fold after this."""
        sums = []
        for index, total in enumerate(self._sums):
            if total is None:
                raise RuntimeError("update_sum after finalize")
            sums.append(total)
            self._sums[index] = None
        return UpdateSum(
            layout=self._layout,
            sums=sums,
            weight=total_weight,
            contributors=contributors,
            payload=self._payload,
        )

    def perturb_sums(self, perturb: Callable[[npt.NDArray[np.floating]], None]) -> None:
        """Apply `perturb` in place to each tensor's running (unnormalised) sum."""
        for total in self._sums:
            if total is None:
                raise RuntimeError("perturb_sums after finalize")
            perturb(total)

    def finalize(self, *, total_weight: float) -> Model:
        """Divide by the total weight and lay the average out in the model's dtypes."""
        if total_weight <= 0:
            raise ValueError(f"total_weight must be positive, got {total_weight}")
        payload = self._payload
        for index, (spec, offset) in enumerate(
            zip(self._layout.specs, self._layout.offsets, strict=True)
        ):
            total = self._sums[index]
            if total is None:
                raise RuntimeError("finalize called twice")
            total /= total.dtype.type(total_weight)
            if not self._in_place[index]:
                out = np.frombuffer(
                    payload, dtype=spec.dtype.storage, count=spec.numel, offset=offset
                )
                if spec.dtype is DType.BFLOAT16:
                    out[...] = float32_to_bfloat16(total.astype(np.float32, copy=False))
                elif spec.dtype is DType.BOOL:
                    out[...] = total >= 0.5
                elif not spec.dtype.is_floating:
                    out[...] = np.rint(total)
                else:
                    out[...] = total
            self._sums[index] = None
        return Model(layout=self._layout, payload=payload)


class FedAvg:
    """Weighted FedAvg: the new model is the example-weighted mean of the updates.

    It is both the current engine's streaming strategy (:meth:`begin_round`) and
    a :class:`fedpriv.strategy.protocol.Strategy` over a round's sum
    (:meth:`aggregate`). The mean of a sum is all it needs, so it works on a
    securely aggregated sum as well.

    Example:
        >>> base = Model.from_arrays({"w": np.zeros(2, np.float32)})
        >>> agg = FedAvg().begin_round(1, model=base)
        >>> for weight, value in ((1, 1.0), (3, 5.0)):
        ...     for offset, chunk in Model.from_arrays(
        ...             {"w": np.full(2, value, np.float32)}).chunks():
        ...         agg.fold(offset, chunk, weight=weight)
        >>> agg.finalize(total_weight=4).arrays()["w"].tolist()
        [4.0, 4.0]
    """

    name = "fedavg"
    supports_secure_aggregation: ClassVar[bool] = True

    def __init__(self) -> None:
        # Payloads of the models this strategy produced, for later rounds' sums.
        self._payloads = RecycledPayloads()

    def begin_round(self, round: int, *, model: Model) -> FedAvgAggregator:
        """Open a new running average with the global model's layout."""
        aggregator = FedAvgAggregator(
            model.layout, payload=self._payloads.take(model.layout.payload_bytes)
        )
        self._payloads.issue(aggregator._payload)
        return aggregator

    def configure(self, round: int) -> Mapping[str, Scalar]:
        """FedAvg announces nothing to the silos."""
        return {}

    def aggregate(self, round: int, *, base: Model, total: UpdateSum) -> Model:
        """The weighted mean of round `round`'s updates; consumes `total`.

        Example:
            >>> layout = Model.from_arrays({"w": np.zeros(2, np.float32)}).layout
            >>> total = UpdateSum(
            ...     layout=layout, sums=[np.array([4.0, 8.0], np.float32)], weight=4.0,
            ...     contributors=2)
            >>> FedAvg().aggregate(1, base=Model.from_arrays({"w": np.zeros(2, np.float32)}),
            ...                    total=total).arrays()["w"].tolist()
            [1.0, 2.0]
        """
        return total.mean()
