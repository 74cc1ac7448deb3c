"""A strategy's state across rounds (a server optimiser's moments), committed with each round.

A :class:`~fedpriv.strategy.protocol.StatefulStrategy` (FedAdam, FedYogi,
FedAdagrad) keeps state that the next round's model depends on. After each
round, that state is written as a checkpoint file of its own,
``checkpoints/strategy-<round>.fpck`` (encrypted at rest like the model's),
published beside the round's model checkpoint, and recorded in the table
``strategy_state`` in the transaction that commits the round. A crash before
that transaction leaves neither the model nor the state of the round; after a
restart, the state of the last committed round is restored, so that a resumed
federation takes the step an uninterrupted one would have taken.

Only the newest committed state is needed: older files are deleted after each
commit (their rows stay, as a record).
"""

from __future__ import annotations

import logging
import pathlib
import sqlite3
from dataclasses import dataclass

from fedpriv.atrest import AtRestKey
from fedpriv.coordinator.checkpoint import map_checkpoint, stage_checkpoint
from fedpriv.errors import StoreError
from fedpriv.wire import Model

__all__ = [
    "STRATEGY_STATE_SCHEMA",
    "StagedState",
    "StoredState",
    "insert_state",
    "load_state",
    "prune_states",
    "stage_state",
    "state_path",
]

logger = logging.getLogger(__name__)

# Created with the store's other tables; an older state folder gets it empty.
STRATEGY_STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS strategy_state (
    round INTEGER PRIMARY KEY,
    strategy TEXT NOT NULL,
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL
);
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class StagedState:
    """A strategy's state written to a temporary file, durable once its round commits."""

    round: int
    strategy: str
    path: pathlib.Path
    temporary: pathlib.Path
    sha256: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredState:
    """The committed state of one round: which strategy wrote it, and the tensors."""

    round: int
    strategy: str
    state: Model


def state_path(checkpoints: pathlib.Path, round: int) -> pathlib.Path:
    """Where the strategy's state after `round` is stored."""
    return checkpoints / f"strategy-{round:06d}.fpck"


def stage_state(
    checkpoints: pathlib.Path, round: int, strategy: str, state: Model, key: AtRestKey | None
) -> StagedState:
    """Write `state` beside the round's checkpoint, not yet durable.

    Raises:
        StoreError: It could not be written.
    """
    path = state_path(checkpoints, round)
    try:
        temporary, digest = stage_checkpoint(path, state, key=key)
    except OSError as err:
        raise StoreError(f"cannot write strategy state {path}: {err.strerror}") from err
    return StagedState(
        round=round, strategy=strategy, path=path, temporary=temporary, sha256=digest
    )


def insert_state(db: sqlite3.Connection, directory: pathlib.Path, staged: StagedState) -> None:
    """Record `staged` (already published) in the round's open transaction."""
    db.execute(
        "INSERT OR REPLACE INTO strategy_state VALUES (?, ?, ?, ?)",
        (staged.round, staged.strategy, str(staged.path.relative_to(directory)), staged.sha256),
    )


def load_state(
    db: sqlite3.Connection, directory: pathlib.Path, round: int, key: AtRestKey | None
) -> StoredState | None:
    """The state committed with `round`, checked against its hash (None if it has none).

    Raises:
        StoreError: The row exists but its file is missing, corrupt or altered.
    """
    row = db.execute(
        "SELECT strategy, file, sha256 FROM strategy_state WHERE round = ?", (round,)
    ).fetchone()
    if row is None:
        return None
    strategy, file, sha256 = row
    state = map_checkpoint(directory / file, sha256=sha256, key=key)
    return StoredState(round=round, strategy=strategy, state=state)


def prune_states(checkpoints: pathlib.Path, newest: int) -> None:
    """Delete the state files of rounds before `newest` (committed): a resume needs only it."""
    for path in checkpoints.glob("strategy-*.fpck"):
        number = path.stem.removeprefix("strategy-")
        if number.isdigit() and int(number) < newest:
            try:
                path.unlink()
            except OSError as err:
                logger.warning("cannot delete old strategy state %s: %s", path.name, err.strerror)
