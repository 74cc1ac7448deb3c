"""The tracking reporter: round events to experiment trackers, from a thread of their own.

:class:`Tracking` is a :class:`~fedpriv.coordinator.phases.RoundReporter` in the
coordinator's chain (telemetry → tracking → the CLI's round table). The round
loop only puts events on a bounded queue; one thread hands them to the sinks.
A tracker that is slow (a server retrying) therefore never holds up a round,
and one that fails (disk full, server down, a refused value) is switched off
with one warning while the federation goes on. A restarted coordinator
switches it on again.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from fedpriv.coordinator.phases import RejectionReporter, RoundReporter, RoundSummary
from fedpriv.coordinator.tracking.records import (
    RunStatus,
    TrackingSink,
    config_params,
    final_metrics,
    round_metrics,
)
from fedpriv.coordinator.tracking.settings import EXTRA
from fedpriv.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from fedpriv.coordinator.config import CoordinatorConfig
    from fedpriv.coordinator.store import Store

__all__ = ["Tracking"]

logger = logging.getLogger(__name__)

_Call = Callable[[TrackingSink], None]
# Rounds are minutes apart; a thousand events queued means a tracker that hangs.
DEFAULT_QUEUE_EVENTS = 1000
DEFAULT_DRAIN_TIMEOUT_S = 30.0


def _sinks(config: CoordinatorConfig) -> list[TrackingSink]:
    """The configured sinks; their packages are imported here, and only here.

    Raises:
        ConfigError: A configured sink's package cannot be imported.
    """
    tracking = config.tracking
    sinks: list[TrackingSink] = []
    try:
        if tracking.mlflow is not None:
            from fedpriv.coordinator.tracking.mlflow_sink import MlflowSink

            sinks.append(
                MlflowSink(
                    tracking.mlflow,
                    experiment=tracking.mlflow.experiment or config.federation,
                    federation=config.federation,
                    state_dir=config.state_dir,
                )
            )
        if tracking.tensorboard is not None:
            from fedpriv.coordinator.tracking.tensorboard_sink import TensorBoardSink

            sinks.append(TensorBoardSink(tracking.tensorboard.log_dir))
    except ImportError as err:
        raise ConfigError(
            f"[tracking] cannot import {err.name or 'a tracking package'!r} ({err}); "
            f"install the tracking packages with: pip install 'fedpriv[{EXTRA}]'"
        ) from err
    return sinks


class Tracking:
    """A :class:`RoundReporter` that logs the federation to trackers, then forwards each event.

    Call :meth:`start` before the first round, :meth:`end` when the federation
    ends, and :meth:`close` on shutdown. Without sinks it only forwards.

    Args:
        sinks: The trackers.
        params: The federation's parameters, logged once the run starts.
        inner: The reporter to forward to (the CLI's round table).
        queue_events: Events held for slow trackers; beyond that they are dropped.
        drain_timeout_s: How long :meth:`close` waits for the trackers to catch up.
    """

    def __init__(
        self,
        sinks: Sequence[TrackingSink],
        *,
        params: Mapping[str, str],
        inner: RoundReporter | None = None,
        queue_events: int = DEFAULT_QUEUE_EVENTS,
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
    ) -> None:
        self._live = list(sinks)
        self._params = dict(params)
        self._inner = inner
        self._queue: queue.Queue[tuple[str, _Call] | None] = queue.Queue(maxsize=queue_events)
        self._drain_timeout_s = drain_timeout_s
        self._thread: threading.Thread | None = None
        self._warned_full = False
        self._failed_attempts: dict[int, int] = {}  # written by the round loop only

    @classmethod
    def from_config(cls, config: CoordinatorConfig, *, inner: RoundReporter | None) -> Tracking:
        """The sinks of ``config.tracking``, forwarding to `inner`.

        Raises:
            ConfigError: A configured sink's package cannot be imported.
        """
        sinks = _sinks(config)
        return cls(sinks, params=config_params(config) if sinks else {}, inner=inner)

    @property
    def sinks(self) -> tuple[str, ...]:
        """The names of the sinks still on (a failed one is off)."""
        return tuple(sink.name for sink in self._live)

    # ---- lifecycle, called by the coordinator -----------------------------------------

    def start(self) -> None:
        """Start the tracking thread; it opens (or continues) the run and logs the parameters."""
        if not self._live or self._thread is not None:
            return
        params = self._params
        self._put("start", lambda sink: sink.start(params))
        self._thread = threading.Thread(target=self._work, name="fedpriv-tracking", daemon=True)
        self._thread.start()

    def end(self, status: RunStatus, *, detail: str = "", results: Store | None = None) -> None:
        """End the run with `status`; `detail` says why it failed.

        Args:
            status: How the federation ended.
            detail: Why, for a failure (the run's ``fedpriv.failure`` tag in MLflow).
            results: The store whose last committed round's evaluation and
                federation figures are logged first, as ``final/...``; None: none.
        """
        if not self._live:
            return
        if results is not None:
            try:
                step, values = final_metrics(results)
            except (StoreError, sqlite3.Error) as err:  # the store's reads raise either
                logger.warning("tracking: cannot read the final results: %s", err)
            else:
                if values:
                    self._put("the final results", lambda sink: sink.log(step, values))
        self._put(f"the end ({status.value})", lambda sink: sink.end(status, detail=detail))

    def close(self) -> None:
        """Wait up to ``drain_timeout_s`` for the trackers to catch up, then close them."""
        thread = self._thread
        if thread is None:
            return
        try:
            self._queue.put(None, timeout=self._drain_timeout_s)
        except queue.Full:
            pass  # the thread is stuck in a tracker: the warning below says so
        thread.join(self._drain_timeout_s)
        if thread.is_alive():
            # A daemon thread: it cannot keep the process alive. A later close may
            # still find it caught up.
            logger.warning(
                "tracking: %s did not catch up within %.1f s; what was still queued is lost",
                ", ".join(self.sinks) or "a tracker",
                self._drain_timeout_s,
            )
            return
        self._thread = None

    # ---- RoundReporter ------------------------------------------------------------------

    def round_completed(self, summary: RoundSummary) -> None:
        """Queue the round's metrics (step = round), then forward."""
        if self._live:
            step, values = summary.round, round_metrics(summary)
            self._put(f"round {step}", lambda sink: sink.log(step, values))
        if self._inner is not None:
            self._inner.round_completed(summary)

    def round_failed(self, round: int, reason: str) -> None:
        """Count the failed attempt (``round/failed_attempts`` at step = round), then forward."""
        if self._live:
            attempts = self._failed_attempts[round] = self._failed_attempts.get(round, 0) + 1
            values = {"round/failed_attempts": float(attempts)}
            self._put(f"round {round}'s failure", lambda sink: sink.log(round, values))
        if self._inner is not None:
            self._inner.round_failed(round, reason)

    def update_rejected(self, *, silo: str, round: int, reason: str, detail: str) -> None:
        """Forward a rejection to an inner reporter that wants them (the round counts it)."""
        if isinstance(self._inner, RejectionReporter):
            self._inner.update_rejected(silo=silo, round=round, reason=reason, detail=detail)

    # ---- the tracking thread ------------------------------------------------------------

    def _put(self, what: str, call: _Call) -> None:
        try:
            self._queue.put_nowait((what, call))
        except queue.Full:
            if not self._warned_full:
                self._warned_full = True
                logger.warning(
                    "tracking: %s is %d events behind; dropping %s and later events until "
                    "it catches up (the federation goes on)",
                    ", ".join(self.sinks),
                    self._queue.maxsize,
                    what,
                )

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            what, call = item
            for sink in list(self._live):
                try:
                    call(sink)
                # A tracker may raise anything (HTTP errors, OSError, its own
                # exceptions); none of it may reach the federation.
                except Exception as err:
                    self._switch_off(sink, what, err)
        for sink in self._live:
            self._close(sink)

    def _switch_off(self, sink: TrackingSink, what: str, err: Exception) -> None:
        self._live.remove(sink)
        logger.warning(
            "tracking: %s failed at %s and is off until the coordinator restarts "
            "(the federation goes on): %s: %s",
            sink.name,
            what,
            type(err).__name__,
            err,
        )
        self._close(sink)

    @staticmethod
    def _close(sink: TrackingSink) -> None:
        try:
            sink.close()
        except Exception as err:  # closing a tracker that failed may fail again; nothing to do
            logger.debug("tracking: closing %s failed: %s", sink.name, err)
