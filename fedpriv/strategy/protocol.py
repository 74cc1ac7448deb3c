"""The plug-in point for aggregation rules.

Every aggregation mode (plain streaming, central DP, secure aggregation) ends
a round with an :class:`UpdateSum`: the weighted sum of the silos' models, the
total weight, and how many silos it holds. A :class:`Strategy` (FedAvg,
FedAdam, ...) turns that sum into the next global model, so every strategy
works in every mode. Rules that need each update on its own (Krum, median,
trimmed mean) are :class:`WholeUpdateStrategy` objects: they read the round's
spooled updates, one slice at a time, and refuse secure aggregation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from fedpriv._types import Scalar
from fedpriv.wire import DType, Model, TensorLayout, bfloat16_to_float32, float32_to_bfloat16

__all__ = [
    "SpooledUpdate",
    "StatefulStrategy",
    "Strategy",
    "UpdateSum",
    "WholeUpdateStrategy",
    "announced",
    "model_from_flat",
]


@dataclass(slots=True, eq=False)
class UpdateSum:
    """A round's aggregate: ``sums[i] = Σ_u w_u · x_u[i]`` over the silos u it holds.

    `x_u` is silo u's model (not its difference from the base). Each entry of
    `sums` is a float32 or float64 array of the tensor's element count; for
    float32/float64 tensors it may be a view into `payload`, the buffer the
    next model is laid out in, so that :meth:`mean` allocates nothing.

    Attributes:
        layout: The global model's layout.
        sums: One flat running sum per tensor of `layout`.
        weight: ``Σ_u w_u`` (the number of silos when each weighs 1).
        contributors: How many silos' updates the sum holds.
        payload: ``layout.payload_bytes`` bytes the sums may live in, or None.
    """

    layout: TensorLayout
    sums: list[npt.NDArray[np.floating]]
    weight: float
    contributors: int
    payload: npt.NDArray[np.uint8] | None = None

    def mean(self) -> Model:
        """The weighted mean model, in the model's dtypes; consumes the sum (in place).

        Raises:
            ValueError: The weight is not positive.
        """
        if not self.weight > 0:
            raise ValueError(f"an update sum's weight must be positive, got {self.weight}")
        payload = (
            self.payload
            if self.payload is not None
            else np.zeros(self.layout.payload_bytes, dtype=np.uint8)
        )
        for spec, offset, total in zip(
            self.layout.specs, self.layout.offsets, self.sums, strict=True
        ):
            total /= total.dtype.type(self.weight)
            _lay_out(payload, spec.dtype, offset, spec.numel, total)
        self.sums = []
        return Model(layout=self.layout, payload=payload)

    def mean_deltas(self, base: Model) -> list[npt.NDArray[np.float64]]:
        """``mean − base`` per tensor, in float64 (for server optimisers); the sum is kept."""
        return [
            self.mean_delta(index, current) for index, current in enumerate(base.arrays().values())
        ]

    def mean_delta(self, index: int, base: npt.NDArray[np.generic]) -> npt.NDArray[np.float64]:
        """``mean − base`` of tensor `index` alone, flat, in float64; the sum is kept.

        One tensor at a time, a server optimiser holds one tensor's float64
        temporaries instead of a float64 copy of the whole model.

        Args:
            index: The tensor's position in `layout`.
            base: That tensor of the base model (any shape of its element count).

        Raises:
            ValueError: The weight is not positive.
        """
        if not self.weight > 0:
            raise ValueError(f"an update sum's weight must be positive, got {self.weight}")
        delta = self.sums[index].astype(np.float64) / self.weight
        delta -= base.reshape(-1).astype(np.float64)
        return delta


def _lay_out(
    payload: npt.NDArray[np.uint8],
    dtype: DType,
    offset: int,
    count: int,
    values: npt.NDArray[np.floating],
) -> None:
    """Write `values` into `payload` at `offset` in `dtype` (no-op when already in place)."""
    out = np.frombuffer(payload, dtype=dtype.storage, count=count, offset=offset)
    if out.ctypes.data == values.ctypes.data and out.dtype == values.dtype:
        return
    if dtype is DType.BFLOAT16:
        out[...] = float32_to_bfloat16(values.astype(np.float32, copy=False))
    elif dtype is DType.BOOL:
        out[...] = values >= 0.5
    elif not dtype.is_floating:
        out[...] = np.rint(values)
    else:
        out[...] = values


def model_from_flat(layout: TensorLayout, tensors: Sequence[npt.NDArray[np.floating]]) -> Model:
    """A new model of `layout` from one flat array per tensor (cast to the model's dtypes)."""
    payload = np.zeros(layout.payload_bytes, dtype=np.uint8)
    for spec, offset, values in zip(layout.specs, layout.offsets, tensors, strict=True):
        _lay_out(payload, spec.dtype, offset, spec.numel, values)
    return Model(layout=layout, payload=payload)


class SpooledUpdate:
    """One silo's complete, validated update, kept in a spool file until the round ends.

    The file holds the update's model payload in the global model's layout. It
    is read in slices, so that a rule over N updates needs N slices of memory,
    not N models.

    Args:
        silo: The sender's identity.
        weight: Its weight (``num_examples``).
        layout: The global model's layout.
        fd: An open file descriptor of the spool (read with ``os.pread``).
    """

    def __init__(self, *, silo: str, weight: float, layout: TensorLayout, fd: int) -> None:
        self.silo = silo
        self.weight = weight
        self.layout = layout
        self._fd = fd

    def read(self, offset: int, length: int) -> bytes:
        """`length` payload bytes from `offset`."""
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise OSError(f"spool of {self.silo!r} ended at {offset + len(data)} bytes")
        return data

    def tensor_slice(self, index: int, start: int, stop: int) -> npt.NDArray[np.float64]:
        """Elements ``[start, stop)`` of tensor `index`, as float64."""
        spec = self.layout.specs[index]
        itemsize = spec.dtype.itemsize
        raw = self.read(self.layout.offsets[index] + start * itemsize, (stop - start) * itemsize)
        values = np.frombuffer(raw, dtype=spec.dtype.storage)
        if spec.dtype is DType.BFLOAT16:
            values = bfloat16_to_float32(values)
        return values.astype(np.float64)


@runtime_checkable
class Strategy(Protocol):
    """A rule that turns a round's :class:`UpdateSum` into the next global model.

    FedAvg returns the mean; server optimisers (FedAdam, FedYogi, FedAdagrad)
    step from the base model along the mean update. A strategy keeps its own
    state across rounds (an optimiser's moments).
    """

    @property
    def name(self) -> str:
        """Short name for logs and the store."""
        ...

    #: Whether the rule's maths holds on a sum whose parts are each clipped and noised.
    supports_secure_aggregation: ClassVar[bool]

    def configure(self, round: int) -> Mapping[str, Scalar]:
        """Settings announced to every silo in round `round`'s task config ({} for none)."""
        ...

    def aggregate(self, round: int, *, base: Model, total: UpdateSum) -> Model:
        """The next global model from round `round`'s sum; may consume `total`."""
        ...


@runtime_checkable
class StatefulStrategy(Protocol):
    """A strategy whose state across rounds must survive a restart (an optimiser's moments).

    The coordinator stores :meth:`state` beside each round's checkpoint and commits
    both in one transaction; after a restart it calls :meth:`restore` with the
    state of the last committed round, so that a resumed federation steps as an
    uninterrupted one would.
    """

    @property
    def name(self) -> str:
        """Short name; a stored state is restored only into a strategy of the same name."""
        ...

    def state(self) -> Model | None:
        """The state after the last :meth:`aggregate` call, as tensors (None before any)."""
        ...

    def restore(self, state: Model) -> None:
        """Take up `state`, as :meth:`state` returned it.

        Raises:
            ValueError: `state` does not fit this strategy and its model.
        """
        ...


@runtime_checkable
class WholeUpdateStrategy(Protocol):
    """A rule that needs every update on its own (Krum, median, trimmed mean, Flower's)."""

    @property
    def name(self) -> str:
        """Short name for logs and the store."""
        ...

    def configure(self, round: int) -> Mapping[str, Scalar]:
        """Settings announced to every silo in round `round`'s task config ({} for none)."""
        ...

    def aggregate_updates(
        self, round: int, *, base: Model, updates: Sequence[SpooledUpdate]
    ) -> Model:
        """The next global model from round `round`'s complete, validated updates."""
        ...


def announced(strategy: Strategy | WholeUpdateStrategy, round: int) -> Mapping[str, Scalar]:
    """What `strategy` announces for `round`, checked to be plain scalars."""
    config = dict(strategy.configure(round))
    for key, value in config.items():
        if not isinstance(value, str | int | float | bool):
            raise TypeError(f"strategy {strategy.name!r} announced {key!r} = {value!r}")
    return config
