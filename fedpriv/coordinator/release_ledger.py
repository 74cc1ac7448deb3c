"""The federation's privacy ledger: every silo-level release, one typed row per round.

A round under ``[dp]`` releases its model through one mechanism: the central
Gaussian of DP-FedAvg, or the Skellam noise the silos add under secure
aggregation. Each such release is a :class:`Release`, and the table
``federation_releases`` in the coordinator's SQLite database holds one row per
committed round that made one. The row is written in the transaction that
commits the round (:meth:`Store.commit_staged
<fedpriv.coordinator.store.Store.commit_staged>`): a model is never committed
without the spend that paid for it, and a round that a crash left uncommitted
leaves no row, as it leaves no model.

At start-up the coordinator's accountant (:class:`FederationAccount`) is rebuilt
from the rows of the rounds before the one it resumes at, and so is the adaptive
clipping norm; the federation's epsilon is then exactly what an uninterrupted run
would have reported. The silo side keeps its own ledger
(:mod:`fedpriv.privacy.ledger`); the two never mix.

A state folder written before this table existed kept its releases as
``federation`` metric rows (``noise_multiplier``, ``skellam_mu``, ...). The first
time such a folder is resumed with the table empty, those rows are read once and
written into the table (:meth:`ReleaseLedger.migrate_metric_rows`); from then on
the metric rows are a report, never an input.
"""

from __future__ import annotations

import enum
import logging
import math
import sqlite3
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedpriv.errors import StoreError
from fedpriv.privacy.accounting import GaussianSteps, PrivacySpent, SkellamSum, account

__all__ = [
    "RELEASES_SCHEMA",
    "FederationAccount",
    "Mechanism",
    "Release",
    "ReleaseLedger",
    "insert_release",
]

logger = logging.getLogger(__name__)

# Created with the store's other tables (CREATE ... IF NOT EXISTS): a state folder
# from before the ledger gets the table, empty, the first time it is opened.
RELEASES_SCHEMA = """
CREATE TABLE IF NOT EXISTS federation_releases (
    round INTEGER PRIMARY KEY,
    mechanism TEXT NOT NULL,
    noise_multiplier REAL,
    skellam_mu REAL,
    l1_sensitivity REAL,
    l2_sensitivity REAL,
    clip_norm REAL NOT NULL,
    next_clip_norm REAL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    colluders_tolerated INTEGER NOT NULL,
    delta REAL NOT NULL
);
"""

_COLUMNS = (
    "round, mechanism, noise_multiplier, skellam_mu, l1_sensitivity, l2_sensitivity, "
    "clip_norm, next_clip_norm, sample_rate, steps, colluders_tolerated, delta"
)
# Plain INSERT, never OR REPLACE: a second release for a committed round would
# hide the first from the accountant, so the round's commit fails instead.
_INSERT = f"INSERT INTO federation_releases ({_COLUMNS}) VALUES ({', '.join('?' * 12)})"


class Mechanism(enum.Enum):
    """How a round's model was noised."""

    GAUSSIAN = "gaussian"
    """Central DP-FedAvg: Gaussian noise on the sum of clipped updates, by the coordinator."""
    SKELLAM = "skellam"
    """Distributed DP: Skellam noise the silos add to their masked integer updates."""


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Release:
    """One round's silo-level release, as the accountant composes it.

    Args:
        round: The committed round whose model this release is.
        mechanism: Gaussian (central) or Skellam (distributed).
        noise_multiplier: Gaussian: the round's overall noise multiplier z (updates
            and adaptive count together), the accountant's input. Skellam: the
            configured ``dp.noise_multiplier`` the ring was planned with (a record only).
        skellam_mu: Skellam only: the variance of the noise in the released integer
            sum that counts (that of the survivors beyond the tolerated colluders).
        l1_sensitivity: Skellam only: L1 sensitivity of the integer sum.
        l2_sensitivity: L2 sensitivity of the sum: the ring's (Skellam), or the
            clipping norm (Gaussian).
        clip_norm: The clipping norm the round's updates were clipped to.
        next_clip_norm: Gaussian only: the (adaptive) norm of the next round; equal
            to `clip_norm` with fixed clipping.
        sample_rate: Probability that a silo takes part (1.0: every silo, always).
        steps: Compositions the release stands for (1 per round).
        colluders_tolerated: Silos assumed to collude with the coordinator (their
            noise does not count; Skellam only, 0 for Gaussian).
        delta: The delta the federation's epsilon is reported at.

    Raises:
        ValueError: A field is missing or out of range for the mechanism.
    """

    round: int
    mechanism: Mechanism
    noise_multiplier: float | None
    skellam_mu: float | None = None
    l1_sensitivity: float | None = None
    l2_sensitivity: float | None = None
    clip_norm: float
    next_clip_norm: float | None = None
    sample_rate: float = 1.0
    steps: int = 1
    colluders_tolerated: int = 0
    delta: float

    def __post_init__(self) -> None:
        problems = []
        if self.round < 1:
            problems.append(f"round = {self.round}: must be >= 1 (round 0 releases nothing)")
        if not _positive(self.clip_norm):
            problems.append(f"clip_norm = {self.clip_norm}: must be a finite number > 0")
        if not 0 < self.delta < 1:
            problems.append(f"delta = {self.delta}: must be in (0, 1)")
        if not 0 < self.sample_rate <= 1:
            problems.append(f"sample_rate = {self.sample_rate}: must be in (0, 1]")
        if self.steps < 1:
            problems.append(f"steps = {self.steps}: must be >= 1")
        if self.colluders_tolerated < 0:
            problems.append(f"colluders_tolerated = {self.colluders_tolerated}: must be >= 0")
        if self.mechanism is Mechanism.GAUSSIAN:
            if not _positive(self.noise_multiplier):
                problems.append(f"noise_multiplier = {self.noise_multiplier}: must be > 0")
            if self.skellam_mu is not None or self.l1_sensitivity is not None:
                problems.append("a Gaussian release has no skellam_mu or l1_sensitivity")
        else:
            for name in ("skellam_mu", "l1_sensitivity", "l2_sensitivity"):
                if not _positive(getattr(self, name)):
                    problems.append(f"{name} = {getattr(self, name)}: must be > 0 for Skellam")
            if (self.sample_rate, self.steps) != (1.0, 1) or self.next_clip_norm is not None:
                problems.append(
                    "a Skellam release is one unsampled sum with a fixed norm "
                    "(sample_rate 1, steps 1, no next_clip_norm)"
                )
        if problems:
            raise ValueError(f"release of round {self.round}: {'; '.join(problems)}")

    def to_accountant(self) -> GaussianSteps | SkellamSum:
        """The release as the accountant's input (:func:`fedpriv.privacy.accounting.account`).

        Example:
            >>> Release(round=1, mechanism=Mechanism.GAUSSIAN, noise_multiplier=1.0,
            ...         clip_norm=1.0, delta=1e-5).to_accountant()
            GaussianSteps(noise_multiplier=1.0, sample_rate=1.0, steps=1)
        """
        mu, l1, l2 = self.skellam_mu, self.l1_sensitivity, self.l2_sensitivity
        if self.mechanism is Mechanism.SKELLAM and mu and l1 and l2:
            return SkellamSum(mu=mu, l1_sensitivity=l1, l2_sensitivity=l2)
        if self.mechanism is Mechanism.GAUSSIAN and self.noise_multiplier:
            return GaussianSteps(
                noise_multiplier=self.noise_multiplier,
                sample_rate=self.sample_rate,
                steps=self.steps,
            )
        raise ValueError(f"release of round {self.round} lacks its mechanism's parameters")

    def _row(self) -> tuple[object, ...]:
        return (
            self.round,
            self.mechanism.value,
            self.noise_multiplier,
            self.skellam_mu,
            self.l1_sensitivity,
            self.l2_sensitivity,
            self.clip_norm,
            self.next_clip_norm,
            self.sample_rate,
            self.steps,
            self.colluders_tolerated,
            self.delta,
        )


def _from_row(row: Sequence[Any]) -> Release:
    (round, mechanism, z, mu, l1, l2, clip, next_clip, rate, steps, colluders, delta) = row
    try:
        return Release(
            round=round,
            mechanism=Mechanism(mechanism),
            noise_multiplier=z,
            skellam_mu=mu,
            l1_sensitivity=l1,
            l2_sensitivity=l2,
            clip_norm=clip,
            next_clip_norm=next_clip,
            sample_rate=rate,
            steps=steps,
            colluders_tolerated=colluders,
            delta=delta,
        )
    except (ValueError, TypeError) as err:
        raise StoreError(
            f"federation_releases holds an unreadable row for round {round}: {err}; the "
            "federation's epsilon cannot be rebuilt without it. Restore state.sqlite3 "
            "from a backup"
        ) from err


def insert_release(db: sqlite3.Connection, release: Release) -> None:
    """Write `release`; call it inside the transaction that commits its round.

    Raises:
        sqlite3.IntegrityError: The round already has a release.
    """
    db.execute(_INSERT, release._row())


def _legacy_release(round: int, values: Mapping[str, float], *, delta: float) -> Release:
    """The release a ``federation`` metric row set of the previous version describes."""
    if "skellam_mu" in values:
        return Release(
            round=round,
            mechanism=Mechanism.SKELLAM,
            noise_multiplier=values.get("noise_multiplier"),
            skellam_mu=values["skellam_mu"],
            l1_sensitivity=values["l1_sensitivity"],
            l2_sensitivity=values["l2_sensitivity"],
            clip_norm=values["clip_norm"],
            colluders_tolerated=int(values.get("colluders_tolerated", 0)),
            delta=values.get("delta", delta),
        )
    return Release(
        round=round,
        mechanism=Mechanism.GAUSSIAN,
        noise_multiplier=values["noise_multiplier"],
        l2_sensitivity=values["clip_norm"],
        clip_norm=values["clip_norm"],
        next_clip_norm=values.get("next_clip_norm"),
        delta=values.get("delta", delta),
    )


class ReleaseLedger:
    """The ``federation_releases`` table of one coordinator's database.

    The :class:`~fedpriv.coordinator.store.Store` creates it on its connection and
    lock (``store.releases``) and writes each staged release in its round's commit.

    Args:
        db: The store's connection (autocommit; transactions are explicit).
        lock: The store's lock, held around every use of `db`.
    """

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self._db = db
        self._lock = lock
        self._staged: Release | None = None

    def stage(self, release: Release) -> None:
        """Hold `release` until its round is staged (:meth:`Store.stage_round`).

        The round loop runs one round at a time: a later call (a new attempt at the
        round, whose first attempt failed before it was staged) replaces it.
        """
        with self._lock:
            self._staged = release

    def take_staged(self, round: int) -> Release | None:
        """The release staged for `round`, now part of that round's commit (else None)."""
        with self._lock:
            staged = self._staged
            if staged is None or staged.round != round:
                return None
            self._staged = None
            return staged

    def releases(self, *, before: int | None = None) -> list[Release]:
        """Committed releases in round order, only those of rounds < `before` if given.

        Raises:
            StoreError: The table cannot be read, or holds a row no release can have.
        """
        query = f"SELECT {_COLUMNS} FROM federation_releases"
        params: tuple[object, ...] = ()
        if before is not None:
            query += " WHERE round < ?"
            params = (before,)
        try:
            with self._lock:
                rows = self._db.execute(query + " ORDER BY round", params).fetchall()
        except sqlite3.Error as err:
            raise StoreError(f"cannot read the federation's release ledger: {err}") from err
        return [_from_row(row) for row in rows]

    def migrate_metric_rows(self, *, delta: float) -> list[Release]:
        """Copy a previous version's releases from its metric rows; return what was copied.

        Runs only while the table is empty: the ``federation`` metric rows of
        committed rounds that stored their noise (``noise_multiplier`` or
        ``skellam_mu``) become releases, all in one transaction. `delta` stands in
        for a row set that did not store its own.

        Raises:
            StoreError: The rows cannot be read or the releases written.
        """
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    migrated = self._migrate(delta=delta)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
        except (sqlite3.Error, KeyError, ValueError) as err:
            raise StoreError(
                f"cannot move the federation's releases from its metric rows into "
                f"federation_releases: {err!r}"
            ) from err
        if migrated:
            logger.info(
                "release ledger migrated releases=%d rounds=%d..%d from federation metric rows",
                len(migrated),
                migrated[0].round,
                migrated[-1].round,
            )
        return migrated

    def _migrate(self, *, delta: float) -> list[Release]:
        if self._db.execute("SELECT 1 FROM federation_releases LIMIT 1").fetchone():
            return []
        per_round: dict[int, dict[str, float]] = {}
        for round, name, value in self._db.execute(
            "SELECT m.round, m.name, m.value FROM metrics m JOIN rounds r ON r.round = m.round "
            "WHERE m.source = 'federation' AND m.round > 0 ORDER BY m.round"
        ):
            per_round.setdefault(round, {})[name] = value
        migrated = [
            _legacy_release(round, values, delta=delta)
            for round, values in sorted(per_round.items())
            if "skellam_mu" in values or "noise_multiplier" in values
        ]
        for release in migrated:
            insert_release(self._db, release)
        return migrated


class FederationAccount:
    """The federation's releases so far, and the epsilon they add up to.

    Holds the committed releases of earlier rounds and the one this round is about
    to commit; the store's ledger is the durable copy. Used by the round loop only.

    Args:
        ledger: Where a new release is staged for its round's commit.
        committed: The releases of the rounds committed before this run.
    """

    def __init__(self, ledger: ReleaseLedger, *, committed: Iterable[Release] = ()) -> None:
        self._ledger = ledger
        self._releases = {release.round: release for release in committed}

    @classmethod
    def resume(cls, ledger: ReleaseLedger, *, next_round: int, delta: float) -> FederationAccount:
        """The account of a coordinator that runs `next_round` next (migrating once).

        Raises:
            StoreError: The ledger (or the metric rows it migrates) cannot be read.
        """
        ledger.migrate_metric_rows(delta=delta)
        return cls(ledger, committed=ledger.releases(before=next_round))

    @property
    def releases(self) -> list[Release]:
        """Every release accounted, in round order."""
        return [self._releases[round] for round in sorted(self._releases)]

    @property
    def next_clip_norm(self) -> float | None:
        """The clipping norm the last central release chose for the round after it."""
        for release in reversed(self.releases):
            if release.mechanism is Mechanism.GAUSSIAN and release.next_clip_norm is not None:
                return release.next_clip_norm
        return None

    def spend(self, release: Release) -> PrivacySpent:
        """Account `release` and stage it for its round's commit; the epsilon after it.

        A release of a round already accounted (an attempt that failed after its
        noise was drawn, and is now tried again) replaces that round's: only a
        committed model is released.
        """
        self._releases[release.round] = release
        self._ledger.stage(release)
        history = [r.to_accountant() for r in self.releases if r.round <= release.round]
        return account(history, delta=release.delta)
