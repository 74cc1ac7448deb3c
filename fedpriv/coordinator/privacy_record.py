"""What committed rounds say about privacy: each round's release mode, each silo's spend.

Both are read from the coordinator's SQLite database (``state.sqlite3``) by the
:class:`~fedpriv.coordinator.store.Store`, which owns the connection and its
lock; the functions here take the connection and hold no state.

- ``round_privacy``: one row per committed round (1, 2, ...), written in the
  round's own transaction: which silo-level DP (:class:`RoundPrivacy`) its model
  was released under.
- Each silo's epsilon and delta are the ``silo:NAME`` metric rows the silo
  reported with its accepted update (:class:`SiloSpend`): they are the silo's own
  figures, which the coordinator only keeps so that a spend never goes down.
- ``discarded_updates``: updates a silo delivered (and so released, spending its
  budget under DP) to an attempt that then failed (:class:`DiscardedUpdate`).

The federation's own releases (noise, clipping, accountant inputs) are not here:
they are the release ledger's (:mod:`fedpriv.coordinator.release_ledger`).
"""

from __future__ import annotations

import enum
import sqlite3
from dataclasses import dataclass

__all__ = [
    "ROUND_PRIVACY_SCHEMA",
    "DiscardedUpdate",
    "RoundPrivacy",
    "SiloSpend",
    "discarded_updates",
    "record_round_privacy",
    "round_privacy",
    "silo_spends",
]

# Created with the store's other tables (CREATE ... IF NOT EXISTS).
ROUND_PRIVACY_SCHEMA = """
CREATE TABLE IF NOT EXISTS round_privacy (
    round INTEGER PRIMARY KEY,
    mode TEXT NOT NULL
);
"""


class RoundPrivacy(enum.Enum):
    """Which silo-level differential privacy a committed round's model was released under."""

    NONE = "none"
    CENTRAL = "central"
    DISTRIBUTED = "distributed"


@dataclass(frozen=True, slots=True, kw_only=True)
class SiloSpend:
    """The sample-level epsilon a silo last reported in a committed round."""

    round: int
    epsilon: float
    delta: float


def record_round_privacy(db: sqlite3.Connection, round: int, privacy: RoundPrivacy) -> None:
    """Write `round`'s mode; call it inside the transaction that commits the round."""
    db.execute("INSERT OR REPLACE INTO round_privacy VALUES (?, ?)", (round, privacy.value))


def round_privacy(db: sqlite3.Connection) -> dict[int, RoundPrivacy]:
    """Which silo-level DP each committed round (1, 2, ...) ran under.

    A round committed before the ``round_privacy`` table existed counts as private
    only if it stored its noise (``noise_multiplier`` or ``skellam_mu``).
    """
    recorded = dict(
        db.execute(
            "SELECT r.round, p.mode FROM rounds r "
            "LEFT JOIN round_privacy p ON p.round = r.round WHERE r.round > 0"
        ).fetchall()
    )
    noised = {
        round: name
        for round, name in db.execute(
            "SELECT round, name FROM metrics WHERE source = 'federation' "
            "AND name IN ('noise_multiplier', 'skellam_mu') ORDER BY name"
        )
    }
    modes = {}
    for round, mode in recorded.items():
        if mode is not None:
            modes[round] = RoundPrivacy(mode)
        elif round in noised:
            modes[round] = (
                RoundPrivacy.DISTRIBUTED if noised[round] == "skellam_mu" else RoundPrivacy.CENTRAL
            )
        else:
            modes[round] = RoundPrivacy.NONE
    return dict(sorted(modes.items()))


def silo_spends(db: sqlite3.Connection) -> dict[str, SiloSpend]:
    """Each silo's epsilon and delta as last reported in a committed round."""
    rows = db.execute(
        "SELECT e.source, e.round, e.value, d.value FROM metrics e "
        "LEFT JOIN metrics d ON d.round = e.round AND d.source = e.source "
        "AND d.name = 'delta' "
        "WHERE e.name = 'epsilon' AND e.source LIKE 'silo:%' ORDER BY e.round"
    ).fetchall()
    return {
        source.removeprefix("silo:"): SiloSpend(
            round=round, epsilon=epsilon, delta=float("nan") if delta is None else delta
        )
        for source, round, epsilon, delta in rows
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class DiscardedUpdate:
    """An update accepted by an attempt at a round that then failed.

    The global model did not change, so whatever the silo spent to release it (its
    DP budget for that round) bought nothing; the retry asks it to train again.
    """

    round: int
    silo: str
    reason: str  # why the attempt failed


# An attempt's participants are those of its round resolved since the round's previous
# attempt ended (both times come from the store's own clock, in write order).
_DISCARDED = """
SELECT a.round, p.silo, a.detail
FROM attempts AS a
JOIN participants AS p
  ON p.round = a.round AND p.task = 'train' AND p.outcome = 'accepted'
 AND p.unix_s <= a.finished_unix_s
 AND p.unix_s > COALESCE(
       (SELECT MAX(b.finished_unix_s) FROM attempts AS b
        WHERE b.round = a.round AND b.id < a.id), 0)
WHERE a.outcome = 'failed'
ORDER BY a.id, p.id
"""


def discarded_updates(db: sqlite3.Connection) -> list[DiscardedUpdate]:
    """Every accepted update that a failed attempt threw away, oldest first."""
    return [
        DiscardedUpdate(round=round, silo=silo, reason=reason)
        for round, silo, reason in db.execute(_DISCARDED)
    ]
