"""Central differential privacy as a wrapper around a streaming aggregation mode.

DP-FedAvg (``fedpriv.privacy.central``): each update's difference from the
global model is clipped to C, every silo weighs 1, Gaussian noise is added to
the sum, and the release is accounted. The wrapped mode and the strategy know
nothing of it: the strategy receives the noised sum like any other, so FedAdam
under DP is DP-FedAdam with no change to FedAdam.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from fedpriv.coordinator.admission import Problem
from fedpriv.coordinator.modes import (
    Announcement,
    PlainMode,
    RoundAggregation,
    RoundRelease,
    UploadPlan,
    nonfinite_message,
    nonfinite_sums,
)
from fedpriv.coordinator.release_ledger import FederationAccount, Mechanism, Release
from fedpriv.coordinator.upload import Upload, UploadResult
from fedpriv.errors import RoundFailed
from fedpriv.privacy.central import ClipState, add_gaussian_noise, secure_generator
from fedpriv.wire import Model

__all__ = ["CentralDPMode"]

logger = logging.getLogger(__name__)


class _CentralDPRound:
    """One round of the wrapped streaming sum, clipped and noised at the end."""

    def __init__(
        self, inner: RoundAggregation, plan: UploadPlan, mode: CentralDPMode, round: int
    ) -> None:
        self._inner = inner
        self.plan = plan
        self._mode = mode
        self._round = round

    def announce(self) -> Announcement:
        return self._inner.announce()

    def policy_problems(self, silo: str) -> list[Problem]:
        return self._inner.policy_problems(silo)

    def take(self, upload: Upload) -> None:
        self._inner.take(upload)

    def close(self, reason: str) -> None:
        self._inner.close(reason)

    def finish(self, results: Sequence[UploadResult]) -> RoundRelease:
        inner = self._inner.finish(results)
        assert inner.total is not None  # a streaming mode
        # Checked before the noise, so that a failed attempt leaves the privacy
        # accounting and the adaptive norm as they were.
        nonfinite = nonfinite_sums(inner.total)
        if nonfinite:
            raise RoundFailed(nonfinite_message(nonfinite))
        clip = self._mode.clip
        dp = clip.dp
        rng = secure_generator()
        stddev = clip.noise_stddev()
        for values in inner.total.sums:
            add_gaussian_noise(values, stddev=stddev, rng=rng)
        clip_norm = self.plan.clip_norm
        assert clip_norm is not None  # opened with the norm
        metrics: dict[str, float] = {}
        if dp.adaptive:
            # Releases only the centred count, noised, over the configured expected_clients
            # (sensitivity 1/2, accounted in update_noise_multiplier); fixed clipping releases
            # no count at all, since none is accounted.
            unclipped = sum(1 for r in results if r.clip_scale == 1.0)
            metrics = {
                "unclipped_fraction": clip.update(unclipped=unclipped, count=len(results), rng=rng),
                "clipped_count_stddev": dp.count_stddev,
                "count_sensitivity": dp.count_sensitivity,
            }
        # Every silo takes part in every round (no sampling amplification is claimed).
        release = Release(
            round=self._round,
            mechanism=Mechanism.GAUSSIAN,
            noise_multiplier=dp.noise_multiplier,
            l2_sensitivity=clip_norm,
            clip_norm=clip_norm,
            next_clip_norm=clip.clip_norm,
            delta=dp.delta,
        )
        spent = self._mode.account.spend(release)  # exact: Gaussian, q = 1
        logger.info(
            "dp round=%d clip_norm=%.4g noise_stddev=%.4g epsilon=%.4f delta=%g",
            self._round,
            clip_norm,
            stddev,
            spent.epsilon,
            dp.delta,
        )
        inner.release = release
        inner.metrics = {
            "epsilon": spent.epsilon,
            "epsilon_rdp": spent.epsilon_rdp,
            "delta": dp.delta,
            "noise_multiplier": dp.noise_multiplier,
            "clip_norm": clip_norm,
            "noise_stddev": stddev,
            "next_clip_norm": clip.clip_norm,
            **metrics,
        }
        return inner


class CentralDPMode:
    """DP-FedAvg around a streaming mode.

    Args:
        inner: The streaming mode whose sum is noised.
        clip: The clipping norm (fixed or adaptive) and the DP settings.
        account: The federation's releases (staged into each round's commit).
    """

    def __init__(self, inner: PlainMode, *, clip: ClipState, account: FederationAccount) -> None:
        self._inner = inner
        self.clip = clip
        self.account = account

    def open(
        self, round: int, *, model: Model, tasks: Mapping[str, str], deadline: float
    ) -> _CentralDPRound:
        """The inner round, with every update clipped to the current norm and weighing 1."""
        inner = self._inner.open(
            round, model=model, tasks=tasks, deadline=deadline, clip_norm=self.clip.clip_norm
        )
        return _CentralDPRound(inner, inner.plan, self, round)
