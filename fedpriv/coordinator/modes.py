"""Aggregation modes: how a round's uploads are received, folded and released.

A mode opens one :class:`RoundAggregation` per TRAIN phase. It says what an
upload must look like (:class:`UploadPlan`), folds each accepted upload, and
ends the round with a :class:`RoundRelease`: an :class:`~fedpriv.strategy.UpdateSum`
for a streaming strategy (or the spooled updates for a whole-update one), the
privacy release, and the metrics the federation publishes. The strategy only
ever sees that sum, so FedAvg, FedAdam and the others work in every mode:

- :class:`PlainMode`: the example-weighted streaming sum;
- :class:`CentralDPMode` (``modes_dp.py``): any streaming mode's sum, clipped
  and noised, with its release accounted;
- :class:`~fedpriv.coordinator.modes_secagg.SecureMode`: the masked ring sum,
  unmasked and decoded;
- :class:`WholeUpdateMode`: each update kept in its spool for rules such as Krum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fedpriv.coordinator.admission import Problem
from fedpriv.coordinator.release_ledger import Release
from fedpriv.coordinator.upload import SpoolPool, Upload, UploadResult
from fedpriv.secagg.settings import SecAggSettings
from fedpriv.strategy.buffers import RecycledPayloads
from fedpriv.strategy.fedavg import FedAvgAggregator
from fedpriv.strategy.protocol import SpooledUpdate, UpdateSum
from fedpriv.wire import Compression, Model, TensorLayout

__all__ = [
    "AggregationMode",
    "Announcement",
    "PlainMode",
    "RoundAggregation",
    "RoundRelease",
    "UploadPlan",
    "WholeUpdateMode",
    "nonfinite_message",
    "nonfinite_sums",
    "nonfinite_tensors",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadPlan:
    """How the uploads of one TRAIN phase are received.

    Attributes:
        layout: What an upload must look like (the model's, or the ring's).
        compression: How chunks are compressed (announced to the silos).
        clip_norm: DP-FedAvg's clipping norm of each update's difference, or None.
        equal_weights: Each silo weighs 1 in the sum (else its ``num_examples``).
        base: The model the updates start from (needed to clip or decompress).
    """

    layout: TensorLayout
    compression: Compression = Compression.NONE
    clip_norm: float | None = None
    equal_weights: bool = False
    base: Model | None = None

    def weight(self, num_examples: int) -> float:
        """The weight of an update of `num_examples` in the sum."""
        return 1.0 if self.equal_weights else float(num_examples)


@dataclass(frozen=True, slots=True, kw_only=True)
class Announcement:
    """What every silo of a TRAIN phase is told about the aggregation (typed Task fields)."""

    compression: Compression = Compression.NONE
    secagg: SecAggSettings | None = None


@dataclass(slots=True, kw_only=True)
class RoundRelease:
    """What a round's aggregation hands to the strategy and the ledger.

    Exactly one of `total` (streaming strategies) and `updates` (whole-update
    strategies) is set.
    """

    total: UpdateSum | None = None
    updates: Sequence[SpooledUpdate] = ()
    release: Release | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class RoundAggregation(Protocol):
    """One TRAIN phase's aggregation state."""

    plan: UploadPlan

    def announce(self) -> Announcement:
        """What every silo of the phase is told (``Task.compression``, ``Task.secagg``)."""
        ...

    def policy_problems(self, silo: str) -> list[Problem]:
        """Why this mode refuses an upload of `silo` now (beyond its header)."""
        ...

    def take(self, upload: Upload) -> None:
        """Fold one finished, accepted upload (called outside the round's lock).

        Raises:
            OSError: The spool could not be read; the round fails.
        """
        ...

    def finish(self, results: Sequence[UploadResult]) -> RoundRelease:
        """End the round with every accepted upload folded.

        Raises:
            RoundFailed: The sum cannot be released (too few to unmask, not finite).
        """
        ...

    def close(self, reason: str) -> None:
        """Free what the round holds (spools, a secure-aggregation session)."""
        ...


class AggregationMode(Protocol):
    """A way of aggregating rounds; opens one :class:`RoundAggregation` per round."""

    def open(
        self, round: int, *, model: Model, tasks: Mapping[str, str], deadline: float
    ) -> RoundAggregation:
        """Start round `round`'s aggregation over the silos in `tasks` (silo → task id)."""
        ...


class _StreamingRound:
    """The weighted streaming sum of one round's models."""

    def __init__(self, plan: UploadPlan, buffers: RecycledPayloads) -> None:
        self.plan = plan
        layout = plan.layout
        self._sum = FedAvgAggregator(layout, payload=buffers.take(layout.payload_bytes))
        buffers.issue(self._sum.payload)
        self._weight = 0.0

    def announce(self) -> Announcement:
        return Announcement(compression=self.plan.compression)

    def policy_problems(self, silo: str) -> list[Problem]:
        return []

    def take(self, upload: Upload) -> None:
        upload.fold(into=self._sum)
        self._weight += self.plan.weight(upload.num_examples)

    def finish(self, results: Sequence[UploadResult]) -> RoundRelease:
        return RoundRelease(total=self._sum.update_sum(self._weight, contributors=len(results)))

    def close(self, reason: str) -> None:
        pass


class PlainMode:
    """The example-weighted streaming sum (FedAvg's, FedAdam's, ...).

    Args:
        compression: The update compression silos use (needs a float32 model).
    """

    def __init__(self, *, compression: Compression = Compression.NONE) -> None:
        self._compression = compression
        self._buffers = RecycledPayloads()

    def open(
        self,
        round: int,
        *,
        model: Model,
        tasks: Mapping[str, str],
        deadline: float,
        clip_norm: float | None = None,
    ) -> _StreamingRound:
        """A streaming sum over the global model's layout.

        With `clip_norm` (set by DP-FedAvg), each update's difference from `model`
        is clipped to it and every silo weighs 1.
        """
        compressed = self._compression is not Compression.NONE
        plan = UploadPlan(
            layout=model.layout,
            compression=self._compression,
            clip_norm=clip_norm,
            # DP-FedAvg weighs every silo equally: the sum's sensitivity is then C.
            equal_weights=clip_norm is not None,
            base=model if clip_norm is not None or compressed else None,
        )
        return _StreamingRound(plan, self._buffers)


class _WholeUpdateRound:
    """Each accepted update's spool, kept until the strategy has read it."""

    def __init__(self, plan: UploadPlan, spools: SpoolPool) -> None:
        self.plan = plan
        self._spools = spools
        self._kept: list[tuple[SpooledUpdate, int]] = []

    def announce(self) -> Announcement:
        return Announcement(compression=self.plan.compression)

    def policy_problems(self, silo: str) -> list[Problem]:
        return []

    def take(self, upload: Upload) -> None:
        fd = upload.detach_spool()
        update = SpooledUpdate(
            silo=upload.silo,
            weight=float(upload.num_examples),
            layout=self.plan.layout,
            fd=fd,
        )
        self._kept.append((update, fd))

    def finish(self, results: Sequence[UploadResult]) -> RoundRelease:
        accepted = {r.silo for r in results}
        return RoundRelease(updates=[u for u, _ in self._kept if u.silo in accepted])

    def close(self, reason: str) -> None:
        kept, self._kept = self._kept, []
        for _, fd in kept:
            self._spools.release(fd)


class WholeUpdateMode:
    """Every update kept whole, in the state directory's spool, once (Krum, median, ...).

    Memory is what the strategy reads at a time; disk is one model per accepted silo.

    Args:
        spools: The coordinator's upload spools (the updates stay in them).
        compression: The update compression silos use.
    """

    def __init__(self, spools: SpoolPool, *, compression: Compression = Compression.NONE) -> None:
        self._spools = spools
        self._compression = compression

    def open(
        self, round: int, *, model: Model, tasks: Mapping[str, str], deadline: float
    ) -> _WholeUpdateRound:
        """Keep each update of `round` in its spool."""
        compressed = self._compression is not Compression.NONE
        plan = UploadPlan(
            layout=model.layout,
            compression=self._compression,
            base=model if compressed else None,
        )
        return _WholeUpdateRound(plan, self._spools)


def nonfinite_sums(total: UpdateSum) -> list[str]:
    """``"name: N NaN or infinite values"`` for each tensor whose running sum has any."""
    problems = []
    for spec, values in zip(total.layout.specs, total.sums, strict=True):
        bad = values.size - int(np.count_nonzero(np.isfinite(values)))
        if bad:
            problems.append(f"{spec.name}: {bad} NaN or infinite values")
    return problems


def nonfinite_message(problems: Sequence[str]) -> str:
    """Why a round whose sum or model is not finite publishes nothing, and what to do."""
    return (
        f"the aggregate is not finite ({'; '.join(problems)}); no model is published. "
        "Every accepted update was within rounds.max_update_value and "
        "rounds.max_num_examples: lower them so that their sum stays finite"
    )


def nonfinite_tensors(model: Model) -> list[str]:
    """Like :func:`nonfinite_sums`, for a model's floating-point tensors."""
    problems = []
    for spec, values in zip(model.layout.specs, model.arrays().values(), strict=True):
        if spec.dtype.is_floating:
            bad = values.size - int(np.count_nonzero(np.isfinite(values)))
            if bad:
                problems.append(f"{spec.name}: {bad} NaN or infinite values")
    return problems
