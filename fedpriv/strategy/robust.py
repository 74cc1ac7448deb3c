"""Byzantine-robust rules over spooled updates: Krum, coordinate-wise median, trimmed mean.

Each rule reads the round's :class:`~fedpriv.strategy.protocol.SpooledUpdate`
files one slice at a time: the same element range of one tensor from every
update, as an ``(N, slice)`` float64 array. Memory is then N slices plus the
one output model, never N models, whatever the model's size. Krum reads every
slice twice: once to sum the pairwise squared distances, once to write the
chosen update (or the mean of the chosen ones).

The rules see individual updates, so they refuse secure aggregation (whose
point is that nobody sees one). They ignore the updates' weights where the
published rule does (median and trimmed mean are unweighted, as in Yin et al.,
2018, and in Flower); multi-Krum averages its selection by weight, as Flower
does. Integer and boolean tensors go through the same rule and are rounded
back.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from fedpriv._types import Scalar
from fedpriv.errors import ConfigError, RoundFailed
from fedpriv.strategy.protocol import SpooledUpdate, _lay_out
from fedpriv.wire import Model, TensorLayout

__all__ = ["DEFAULT_SLICE_BYTES", "Krum", "Median", "TrimmedMean"]

#: float64 bytes read from each update at once: 1 MiB, so 100 silos take 100 MiB.
DEFAULT_SLICE_BYTES = 1 << 20


def _slice_elements(rule: str, slice_bytes: int) -> int:
    if isinstance(slice_bytes, bool) or not isinstance(slice_bytes, int) or slice_bytes < 8:
        raise ConfigError(f"{rule} slice_bytes = {slice_bytes!r}: must be an integer >= 8")
    return slice_bytes // 8


def _slices(layout: TensorLayout, elements: int) -> Iterator[tuple[int, int, int]]:
    """``(tensor, start, stop)`` for every slice of at most `elements` elements."""
    for index, spec in enumerate(layout.specs):
        for start in range(0, spec.numel, elements):
            yield index, start, min(start + elements, spec.numel)


def _stack(
    updates: Sequence[SpooledUpdate], index: int, start: int, stop: int
) -> npt.NDArray[np.float64]:
    """The same slice of every update, one row each."""
    rows = np.empty((len(updates), stop - start), dtype=np.float64)
    for row, update in enumerate(updates):
        rows[row] = update.tensor_slice(index, start, stop)
    return rows


def _check_updates(rule: str, base: Model, updates: Sequence[SpooledUpdate]) -> None:
    if not updates:
        raise RoundFailed(f"{rule}: the round has no complete update to aggregate")
    strangers = sorted({u.silo for u in updates if u.layout != base.layout})
    if strangers:
        raise RoundFailed(
            f"{rule}: the updates of {', '.join(strangers)} are not in the global model's layout"
        )


class _Output:
    """The output model's payload, written slice by slice in the model's dtypes."""

    def __init__(self, layout: TensorLayout) -> None:
        self.layout = layout
        self.payload = np.zeros(layout.payload_bytes, dtype=np.uint8)

    def write(self, index: int, start: int, values: npt.NDArray[np.floating]) -> None:
        spec = self.layout.specs[index]
        offset = self.layout.offsets[index] + start * spec.dtype.itemsize
        _lay_out(self.payload, spec.dtype, offset, len(values), values)

    def model(self) -> Model:
        return Model(layout=self.layout, payload=self.payload)


class _WholeUpdateRule:
    """What the three rules share: no announcement, no secure aggregation."""

    name: ClassVar[str]
    supports_secure_aggregation: ClassVar[bool] = False

    def configure(self, round: int) -> Mapping[str, Scalar]:
        """Robust rules announce nothing to the silos."""
        return {}


class Krum(_WholeUpdateRule):
    """Krum and multi-Krum (Blanchard et al., 2017): keep the updates closest to their peers.

    Each update's score is the sum of its squared distances to its
    ``N - f - 2`` nearest other updates. Krum (``keep = 1``) returns the update
    of lowest score; multi-Krum returns the weighted mean of the ``keep``
    lowest. Flower's ``Krum(num_malicious_clients=f, num_clients_to_keep=m)``
    computes the same model.

    Args:
        byzantine: ``f``, the number of Byzantine silos tolerated (>= 0).
        keep: ``m``, how many updates to keep (1 is Krum).
        slice_bytes: float64 bytes read from each update at once.

    Raises:
        ConfigError: `byzantine` < 0, `keep` < 1 or `slice_bytes` < 8.
    """

    name = "krum"

    def __init__(
        self, *, byzantine: int, keep: int = 1, slice_bytes: int = DEFAULT_SLICE_BYTES
    ) -> None:
        if isinstance(byzantine, bool) or not isinstance(byzantine, int) or byzantine < 0:
            raise ConfigError(f"krum byzantine = {byzantine!r}: must be an integer >= 0")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"krum keep = {keep!r}: must be an integer >= 1 (1 is Krum)")
        self.byzantine = byzantine
        self.keep = keep
        self._elements = _slice_elements(self.name, slice_bytes)

    def scores(self, base: Model, updates: Sequence[SpooledUpdate]) -> npt.NDArray[np.float64]:
        """Each update's Krum score (lower is more central).

        Raises:
            ConfigError: Too few updates for `byzantine`: Krum needs ``N > 2f + 2``.
            RoundFailed: No updates, or one in another layout.
        """
        _check_updates(self.name, base, updates)
        count = len(updates)
        if count <= 2 * self.byzantine + 2:
            raise ConfigError(
                f"krum with byzantine = {self.byzantine} needs more than "
                f"{2 * self.byzantine + 2} updates (N > 2f + 2), got {count}; "
                "lower strategy.options.byzantine or wait for more silos"
            )
        squared = np.zeros((count, count), dtype=np.float64)
        for index, start, stop in _slices(base.layout, self._elements):
            rows = _stack(updates, index, start, stop)
            for i in range(count - 1):
                diff = rows[i + 1 :] - rows[i]
                partial = np.einsum("ij,ij->i", diff, diff)
                squared[i, i + 1 :] += partial
                squared[i + 1 :, i] += partial
        nearest = count - self.byzantine - 2
        scores = np.empty(count, dtype=np.float64)
        for i in range(count):
            others = np.delete(squared[i], i)
            scores[i] = np.sort(others)[:nearest].sum()
        return scores

    def aggregate_updates(
        self, round: int, *, base: Model, updates: Sequence[SpooledUpdate]
    ) -> Model:
        """The most central update, or the weighted mean of the `keep` most central.

        Raises:
            ConfigError: Too few updates: ``N > 2f + 2`` and ``keep <= N - f`` must hold.
            RoundFailed: No updates, or one in another layout.
        """
        scores = self.scores(base, updates)
        if self.keep > len(updates) - self.byzantine:
            raise ConfigError(
                f"multi-krum keep = {self.keep} with byzantine = {self.byzantine} needs "
                f"keep <= N - f = {len(updates) - self.byzantine}; lower strategy.options.keep"
            )
        chosen = [updates[i] for i in np.argsort(scores, kind="stable")[: self.keep]]
        if len(chosen) == 1:
            # The update itself, byte for byte, without a round trip through float64.
            payload = np.empty(base.layout.payload_bytes, dtype=np.uint8)
            step = max(self._elements * 8, 1)
            for offset in range(0, base.layout.payload_bytes, step):
                length = min(step, base.layout.payload_bytes - offset)
                payload[offset : offset + length] = np.frombuffer(
                    chosen[0].read(offset, length), dtype=np.uint8
                )
            return Model(layout=base.layout, payload=payload)
        weights = np.array([u.weight for u in chosen], dtype=np.float64)
        if not weights.sum() > 0:
            raise RoundFailed(f"multi-krum: the kept updates weigh {weights.sum()} in total")
        out = _Output(base.layout)
        for index, start, stop in _slices(base.layout, self._elements):
            out.write(index, start, weights @ _stack(chosen, index, start, stop) / weights.sum())
        return out.model()


class Median(_WholeUpdateRule):
    """Coordinate-wise median (Yin et al., 2018), unweighted, as Flower's ``FedMedian``.

    With an even number of updates an element is the mean of the middle two.

    Args:
        slice_bytes: float64 bytes read from each update at once.

    Raises:
        ConfigError: `slice_bytes` < 8.
    """

    name = "median"

    def __init__(self, *, slice_bytes: int = DEFAULT_SLICE_BYTES) -> None:
        self._elements = _slice_elements(self.name, slice_bytes)

    def aggregate_updates(
        self, round: int, *, base: Model, updates: Sequence[SpooledUpdate]
    ) -> Model:
        """Each element's median over the updates.

        Raises:
            RoundFailed: No updates, or one in another layout.
        """
        _check_updates(self.name, base, updates)
        out = _Output(base.layout)
        for index, start, stop in _slices(base.layout, self._elements):
            out.write(index, start, np.median(_stack(updates, index, start, stop), axis=0))
        return out.model()


class TrimmedMean(_WholeUpdateRule):
    """Coordinate-wise trimmed mean (Yin et al., 2018), unweighted, as Flower's ``FedTrimmedAvg``.

    Of N updates, ``int(beta * N)`` of the largest and as many of the smallest
    values of each element are dropped and the rest averaged.

    Args:
        beta: Fraction trimmed from each side, in (0, 0.5).
        slice_bytes: float64 bytes read from each update at once.

    Raises:
        ConfigError: `beta` outside (0, 0.5), or `slice_bytes` < 8.
    """

    name = "trimmed_mean"

    def __init__(self, *, beta: float = 0.2, slice_bytes: int = DEFAULT_SLICE_BYTES) -> None:
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 < beta < 0.5:
            raise ConfigError(
                f"trimmed_mean beta = {beta!r}: must be in (0, 0.5), the fraction trimmed "
                "from each side"
            )
        self.beta = float(beta)
        self._elements = _slice_elements(self.name, slice_bytes)

    def trimmed(self, count: int) -> int:
        """How many updates are trimmed from each side of `count`.

        Raises:
            ConfigError: `count` is too small to trim one update from each side.
        """
        cut = int(self.beta * count)
        if cut < 1:
            needed = math.ceil(1 / self.beta)
            while int(self.beta * needed) < 1:  # 1 / beta rounded down in floating point
                needed += 1
            raise ConfigError(
                f"trimmed_mean with beta = {self.beta} trims nothing from {count} updates "
                f"(int(beta * N) = 0), so one poisoned update would pass; it needs at least "
                f"{needed} updates, or a larger beta"
            )
        return cut

    def aggregate_updates(
        self, round: int, *, base: Model, updates: Sequence[SpooledUpdate]
    ) -> Model:
        """Each element's mean after trimming ``int(beta * N)`` values from each side.

        Raises:
            ConfigError: Too few updates to trim one from each side.
            RoundFailed: No updates, or one in another layout.
        """
        _check_updates(self.name, base, updates)
        cut = self.trimmed(len(updates))
        keep = slice(cut, len(updates) - cut)
        out = _Output(base.layout)
        for index, start, stop in _slices(base.layout, self._elements):
            rows = np.sort(_stack(updates, index, start, stop), axis=0)
            out.write(index, start, rows[keep].mean(axis=0))
        return out.model()
