"""The pipelined durable commit of a round.

A completed round's checkpoint is written at once but made durable (fsync,
rename, one SQLite transaction) only after the next phase has opened, so that
the silos download the new model while the disk syncs. A round is reported as
completed only once durable: what an operator saw completed survives a crash.
"""

from __future__ import annotations

import threading

from fedpriv.coordinator.phases import RoundReporter, RoundSummary
from fedpriv.coordinator.store import StagedRound, Store

__all__ = ["StagedCommit"]


class StagedCommit:
    """At most one round written but not yet durable, and its summary.

    Args:
        store: Where the round is committed.
        reporter: Told of the round once it is durable.
    """

    def __init__(self, store: Store, reporter: RoundReporter) -> None:
        self._store = store
        self._reporter = reporter
        self._lock = threading.Lock()
        self._staged: StagedRound | None = None
        self._summary: RoundSummary | None = None

    def stage(self, staged: StagedRound) -> None:
        """Hold `staged` until :meth:`commit` (one commits before the next is staged)."""
        with self._lock:
            if self._staged is not None:
                raise RuntimeError(f"round {self._staged.round} is still staged")
            self._staged = staged

    @property
    def pending(self) -> bool:
        """Whether a round is staged and not yet durable."""
        with self._lock:
            return self._staged is not None

    def report(self, summary: RoundSummary) -> None:
        """Report `summary` once its round is durable (now, if it already is)."""
        with self._lock:
            if self._staged is not None and self._staged.round == summary.round:
                self._summary = summary
                return
        self._reporter.round_completed(summary)

    def commit(self) -> None:
        """Make the staged round durable and report it (no-op when none is staged).

        Raises:
            StoreError: It could not be written; the round is not committed.
        """
        with self._lock:
            staged, summary = self._staged, self._summary
            self._staged = self._summary = None
        if staged is None:
            return
        self._store.commit_staged(staged)
        if summary is not None:
            self._reporter.round_completed(summary)
