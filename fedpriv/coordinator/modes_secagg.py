"""Secure aggregation as an aggregation mode: the coordinator learns only the sum.

Silos clip, quantise and mask their updates' differences in Z/2^32; the
coordinator folds the masked chunks with modular addition, collects the shares
that remove the masks, and decodes the sum. What the strategy receives is an
ordinary :class:`~fedpriv.strategy.UpdateSum` (each silo weighing 1), so a
server optimiser such as FedAdam runs under secure aggregation unchanged.
With ``[dp]``, each silo also adds its share of Skellam noise, and the round's
release is accounted over the survivors that did not collude.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from fedpriv.coordinator.admission import Problem
from fedpriv.coordinator.config import SecAggConfig
from fedpriv.coordinator.modes import Announcement, RoundRelease, UploadPlan
from fedpriv.coordinator.phases import Reason
from fedpriv.coordinator.release_ledger import FederationAccount, Mechanism, Release
from fedpriv.coordinator.upload import Upload, UploadResult
from fedpriv.errors import ConfigError, RoundFailed
from fedpriv.privacy.central import CentralDP
from fedpriv.secagg import RingCodec, ServerSession
from fedpriv.secagg.graph import GraphPlan
from fedpriv.secagg.ring_sum import RingSum
from fedpriv.secagg.settings import SecAggSettings
from fedpriv.strategy.protocol import UpdateSum
from fedpriv.wire import Model

__all__ = ["SecureMode", "SecureRound"]

logger = logging.getLogger(__name__)


class SecureRound:
    """One round's secure-aggregation session and masked ring sum."""

    def __init__(
        self,
        mode: SecureMode,
        *,
        round: int,
        model: Model,
        session: ServerSession,
        codec: RingCodec,
        chunk_bytes: int,
        min_survivors: int,
    ) -> None:
        self._mode = mode
        self._min_survivors = min_survivors
        self._round = round
        self._model = model
        self.session = session
        self._codec = codec
        self.settings = SecAggSettings.from_codec(
            codec,
            session=session.session,
            threshold=session.threshold,
            chunk_bytes=chunk_bytes,
            degree=session.degree,
            max_dropped=session.max_dropped,
        )
        self.plan = UploadPlan(layout=self.settings.layout, equal_weights=True)
        self._ring = RingSum(codec.size, chunk_bytes=chunk_bytes)

    def announce(self) -> Announcement:
        """The ring and session settings every silo of the round needs (``Task.secagg``)."""
        return Announcement(secagg=self.settings)

    def policy_problems(self, silo: str) -> list[Problem]:
        """A silo that did not share its keys may not upload: its masks stay."""
        if self.session.may_upload(silo):
            return []
        text = "this silo did not share its keys: its masks could not be removed"
        return [Problem(Reason.SECAGG, text)]

    def take(self, upload: Upload) -> None:
        """Add a masked update to the ring sum (modulo 2^32)."""
        upload.fold(into=self._ring)

    def close(self, reason: str) -> None:
        """End the session: its barriers stop waiting."""
        self.session.cancel(reason)

    def finish(self, results: Sequence[UploadResult]) -> RoundRelease:
        """Unmask the survivors' sum and decode it; account the noise with [dp].

        Raises:
            RoundFailed: Too few survivors, or a secret could not be recovered.
        """
        survivors = [r.silo for r in results]
        session = self.session
        try:
            if len(survivors) < self._min_survivors:
                raise RoundFailed(
                    f"{len(survivors)} masked updates, "
                    f"{self._min_survivors} needed to unmask; no model is published"
                )
            session.set_roster(survivors)
            unmask_deadline_s = self._mode.settings.unmask_deadline_s
            session.wait_for_shares(until=self._mode.clock() + unmask_deadline_s)
            unmask_started = time.perf_counter()
            session.unmask_sum(self._ring.total)
            logger.info(
                "unmasked round=%d survivors=%d dropped=%d unmask_s=%.3f",
                self._round,
                len(survivors),
                len(session.tasks) - len(survivors),
                time.perf_counter() - unmask_started,
            )
        except RoundFailed as err:
            session.cancel(str(err))
            if session.blamed:
                self._mode.bench(session.blamed)
                logger.warning(
                    "round=%d benched=%s until the round completes (shares did not authenticate)",
                    self._round,
                    ",".join(session.blamed),
                )
            raise
        session.cancel("the round's secure aggregation is complete")
        release = RoundRelease(total=self._decode(len(survivors)))
        release.metrics["survivors"] = float(len(survivors))
        dp = self._mode.dp
        if dp is not None:
            self._account(release, survivors=len(survivors), dp=dp)
        return release

    def _decode(self, survivors: int) -> UpdateSum:
        """The unmasked ring sum Σ Δ_u as the sum of models Σ (base + Δ_u), each weighing 1."""
        total = self._codec.decode(self._ring.total)  # float64, one element per parameter
        sums: list[npt.NDArray[np.floating]] = []
        position = 0
        for spec, current in zip(
            self._model.layout.specs, self._model.arrays().values(), strict=True
        ):
            part = total[position : position + spec.numel]
            position += spec.numel
            part += current.reshape(-1).astype(np.float64) * survivors
            sums.append(part)
        self._model.evict(0, self._model.layout.payload_bytes)
        return UpdateSum(
            layout=self._model.layout, sums=sums, weight=float(survivors), contributors=survivors
        )

    def _account(self, release: RoundRelease, *, survivors: int, dp: CentralDP) -> None:
        # Up to k colluding survivors know (and can subtract) their own noise: only
        # the other survivors' noise counts towards the guarantee.
        colluders = self._mode.settings.tolerate_colluders
        skellam = Release(
            round=self._round,
            mechanism=Mechanism.SKELLAM,
            noise_multiplier=dp.noise_multiplier,
            skellam_mu=(survivors - colluders) * self._codec.noise_variance,
            l1_sensitivity=self._codec.l1_sensitivity,
            l2_sensitivity=self._codec.l2_sensitivity,
            clip_norm=self._codec.clip_norm,
            colluders_tolerated=colluders,
            delta=dp.delta,
        )
        assert self._mode.account is not None  # checked with dp in SecureMode
        spent = self._mode.account.spend(skellam)
        release.release = skellam
        release.metrics.update(
            {
                "epsilon": spent.epsilon,
                "epsilon_rdp": spent.epsilon_rdp,
                "delta": dp.delta,
                "skellam_mu": float(skellam.skellam_mu or 0.0),
                "l1_sensitivity": self._codec.l1_sensitivity,
                "l2_sensitivity": self._codec.l2_sensitivity,
                "clip_norm": self._codec.clip_norm,
                "noise_multiplier": dp.noise_multiplier,
                "colluders_tolerated": float(colluders),
            }
        )
        logger.info(
            "distributed dp round=%d epsilon=%.4f delta=%g colluders_tolerated=%d",
            self._round,
            spent.epsilon,
            dp.delta,
            colluders,
        )


class SecureMode:
    """Secure aggregation (optionally with distributed DP) of every round.

    Args:
        settings: The ``[secagg]`` settings.
        dp: The ``[dp]`` settings (Skellam noise shares), or None.
        account: The federation's releases (with `dp`).
        alive: Whether a silo is still connected.
        clock: Monotonic seconds.
        on_refused: Called when a silo's keys or shares are refused (it is out of the round).
        bench: Called with the silos blamed for a failed unmasking.

    Raises:
        ConfigError: The model has tensors that are not floating point.
    """

    def __init__(
        self,
        settings: SecAggConfig,
        *,
        model: Model,
        dp: CentralDP | None,
        account: FederationAccount | None,
        alive: Callable[[str], bool],
        clock: Callable[[], float],
        on_refused: Callable[[str, str], None],
        bench: Callable[[Collection[str]], None],
    ) -> None:
        bad = [s.describe() for s in model.layout.specs if not s.dtype.is_floating]
        if bad:
            raise ConfigError(
                "secure_aggregation = true needs a model of floating-point tensors only; "
                f"this one also has {', '.join(bad)}"
            )
        self.settings = settings
        self.dp = dp
        if dp is not None and account is None:
            raise ValueError("distributed DP needs the federation's release account")
        self.account = account
        self.clock = clock
        self.bench = bench
        self._alive = alive
        self._on_refused = on_refused
        self._last_plan: GraphPlan | None = None

    def open(
        self, round: int, *, model: Model, tasks: Mapping[str, str], deadline: float
    ) -> SecureRound:
        """Plan the ring and start the round's session."""
        plan = self.settings.graph_for(len(tasks))
        if plan != self._last_plan:
            logger.info("secagg plan round=%d %s", round, plan.describe())
            self._last_plan = plan
        size = sum(spec.numel for spec in model.layout.specs)
        dp = self.dp
        codec = RingCodec.plan(
            clip_norm=dp.clip_norm if dp is not None else self.settings.clip_norm,
            size=size,
            clients=len(tasks),
            # The noise covers the fewest survivors a round unmasks with.
            threshold=plan.min_survivors,
            noise_multiplier=dp.noise_multiplier if dp is not None else 0.0,
            tolerate_colluders=self.settings.tolerate_colluders,
        )
        session = ServerSession(
            session=uuid.uuid4().hex,
            round=round,
            tasks=tasks,
            threshold=plan.threshold,
            deadline=deadline,
            alive=self._alive,
            clock=self.clock,
            on_refused=self._on_refused,
            degree=0 if plan.complete else plan.degree,
            max_dropped=0 if plan.complete else plan.dropped,
        )
        return SecureRound(
            self,
            round=round,
            model=model,
            session=session,
            codec=codec,
            chunk_bytes=model.layout.chunk_bytes,
            min_survivors=plan.min_survivors,
        )
