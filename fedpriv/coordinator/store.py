"""Durable coordinator state: SQLite for rounds and metrics, atomic files for checkpoints.

Order of writes for a round: the checkpoint file is written, fsynced and
renamed into place first; only then is the round committed in SQLite. After a
crash the last committed round always has a complete checkpoint, and a
checkpoint without a committed round is ignored.

With an encryption key, checkpoints are encrypted at rest (:mod:`fedpriv.atrest`);
the SQLite database is not.
"""

from __future__ import annotations

import logging
import pathlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from fedpriv._types import Scalar
from fedpriv.atrest import AtRestKey
from fedpriv.coordinator.audit import AuditLog
from fedpriv.coordinator.checkpoint import map_checkpoint, stage_checkpoint
from fedpriv.coordinator.privacy_record import (
    DiscardedUpdate,
    RoundPrivacy,
    SiloSpend,
    discarded_updates,
    record_round_privacy,
    round_privacy,
    silo_spends,
)
from fedpriv.coordinator.release_ledger import (
    Release,
    ReleaseLedger,
    insert_release,
)
from fedpriv.coordinator.schema import SCHEMA
from fedpriv.coordinator.strategy_state import (
    StagedState,
    StoredState,
    insert_state,
    load_state,
    prune_states,
    stage_state,
)
from fedpriv.errors import StoreError
from fedpriv.faults import FaultPoint, reach
from fedpriv.storage import publish
from fedpriv.wire import Model

__all__ = ["CommittedRound", "StagedRound", "Store"]

logger = logging.getLogger(__name__)


_INSERT_ATTEMPT = (
    "INSERT INTO attempts (round, started_unix_s, finished_unix_s, outcome, detail) "
    "VALUES (?, ?, ?, ?, ?)"
)


def _numeric_rows(
    round: int, source: str, values: Mapping[str, Scalar]
) -> list[tuple[int, str, str, float]]:
    return [
        (round, source, name, float(value))
        for name, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class CommittedRound:
    """A round that completed and whose checkpoint is durable."""

    round: int
    checkpoint: pathlib.Path
    sha256: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StagedRound:
    """A round whose checkpoint is written to a temporary file but not yet durable."""

    round: int
    checkpoint: pathlib.Path
    temporary: pathlib.Path
    sha256: str
    started_unix_s: float
    selected: int
    accepted: int
    total_weight: float
    metrics: dict[str, dict[str, Scalar]]
    record_attempt: bool
    payload_bytes: int
    write_s: float
    privacy: RoundPrivacy | None = None
    release: Release | None = None
    strategy_state: StagedState | None = None


class Store:
    """SQLite database and checkpoint folder of one coordinator (thread-safe).

    Args:
        directory: Created if missing; holds ``state.sqlite3`` and ``checkpoints/``.
        keep_checkpoints: Keep the checkpoints of only the newest N committed rounds
            (and the initial model's, round 0); older ones are deleted after each
            commit. 0 keeps every checkpoint.
        key: Encrypt checkpoints under this key (``[store] encryption_key_file``);
            None writes and reads them plain.
    """

    def __init__(
        self,
        directory: pathlib.Path,
        *,
        keep_checkpoints: int = 0,
        key: AtRestKey | None = None,
    ) -> None:
        if keep_checkpoints < 0:
            raise ValueError(f"keep_checkpoints must be >= 0, not {keep_checkpoints}")
        self.directory = directory
        self._key = key
        self.checkpoints = directory / "checkpoints"
        self.keep_checkpoints = keep_checkpoints
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                directory / "state.sqlite3", check_same_thread=False, isolation_level=None
            )
            # WAL keeps readers (fedpriv status) off the writer's back; FULL makes each
            # commit durable before the call returns.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise StoreError(f"cannot open coordinator state in {directory}: {err}") from err
        self._lock = threading.Lock()
        # Joins, leaves, rejections, denials and admin calls (fedpriv audit-log).
        self.audit = AuditLog(self._db, self._lock)
        # The federation's silo-level releases, one row per round, committed with it.
        self.releases = ReleaseLedger(self._db, self._lock)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def _write(self, sql: str, params: tuple[object, ...]) -> None:
        try:
            with self._lock:
                self._db.execute(sql, params)
        except sqlite3.Error as err:
            raise StoreError(f"cannot write coordinator state: {err}") from err

    def remove_orphans(self) -> list[pathlib.Path]:
        """Delete checkpoints a crash left half written or never committed; return them.

        No committed round refers to them: temporary files, and checkpoints renamed
        into place whose round's SQLite transaction never ran (a crash between the
        two). Call it only while no coordinator runs on this folder: a running
        one's staged checkpoint looks the same.
        """
        with self._lock:
            states = self._db.execute("SELECT file FROM strategy_state").fetchall()
        committed = {self.checkpoint_path(round) for round in self.rounds()}
        committed |= {self.directory / file for (file,) in states}
        published = (
            path
            for pattern in ("round-*.fpck", "strategy-*.fpck")
            for path in self.checkpoints.glob(pattern)
            if path not in committed
        )
        temporary = [
            *self.checkpoints.glob(".round-*.tmp"),
            *self.checkpoints.glob(".strategy-*.tmp"),
        ]
        orphans = sorted([*temporary, *published])
        for orphan in orphans:
            orphan.unlink(missing_ok=True)
        return orphans

    def load_checkpoint(self, path: pathlib.Path, *, sha256: str | None = None) -> Model:
        """The model in the checkpoint at `path`, to serve: mapped, or decrypted into memory.

        A plain checkpoint is mapped (:func:`map_checkpoint`); an encrypted one is
        decrypted into memory, since its pages hold ciphertext.

        Raises:
            StoreError: It is missing, corrupt or its hash differs from `sha256`.
            IntegrityError: With a key: it is plain, under another key, or modified.
            ConfigError: Without a key: it is encrypted.
        """
        return map_checkpoint(path, sha256=sha256, key=self._key)

    def strategy_state(self, round: int) -> StoredState | None:
        """The strategy state committed with `round`, if any (see :meth:`stage_round`).

        Raises:
            StoreError: Its file is missing, corrupt or altered.
        """
        with self._lock:
            return load_state(self._db, self.directory, round, self._key)

    def checkpoint_path(self, round: int) -> pathlib.Path:
        """Where the model after `round` is stored (round 0: the initial model)."""
        return self.checkpoints / f"round-{round:06d}.fpck"

    def prune_checkpoints(self, newest: int) -> list[int]:
        """Delete checkpoints of rounds 1 .. `newest` - keep_checkpoints; return their rounds.

        `newest` must be committed. The folder is scanned, not the database, so a
        deletion that a crash undid is redone on the next commit. Round 0 (the
        initial model) and anything newer than `newest` (an orphan that the next
        commit overwrites) are left alone. A download in flight keeps reading a
        deleted checkpoint through its mapping.
        """
        if not self.keep_checkpoints:
            return []
        removed = []
        for path in self.checkpoints.glob("round-*.fpck"):
            number = path.stem.removeprefix("round-")
            if not number.isdigit() or not 0 < int(number) <= newest - self.keep_checkpoints:
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as err:
                # The round is committed either way; the file is tried again next time.
                logger.warning("cannot delete old checkpoint %s: %s", path.name, err.strerror)
                continue
            removed.append(int(number))
        if removed:
            logger.info(
                "deleted checkpoints of rounds %s (store.keep_checkpoints = %d)",
                ", ".join(map(str, sorted(removed))),
                self.keep_checkpoints,
            )
        return sorted(removed)

    def last_committed(self) -> CommittedRound | None:
        """The newest committed round, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT round, checkpoint, sha256 FROM rounds ORDER BY round DESC LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        return CommittedRound(round=row[0], checkpoint=self.directory / row[1], sha256=row[2])

    def stage_round(
        self,
        *,
        round: int,
        model: Model,
        started_unix_s: float,
        selected: int,
        accepted: int,
        total_weight: float,
        metrics: Mapping[str, Mapping[str, Scalar]] | None = None,
        record_attempt: bool = False,
        privacy: RoundPrivacy | None = None,
        strategy_state: tuple[str, Model] | None = None,
    ) -> StagedRound:
        """Write `model` as the checkpoint of `round`, not yet durable (see :meth:`commit_staged`).

        The returned round's ``temporary`` file holds the complete checkpoint and
        may be read (mapped) at once; it keeps its contents when
        :meth:`commit_staged` renames it into place. Until then, a crash loses it
        and the round counts as never completed.

        `metrics` (per source) are committed in the same transaction as the round,
        so a published model and its privacy spend are never recorded apart. With
        `record_attempt`, the completed attempt is too: one fsync instead of one
        per row. `privacy` records which silo-level DP the round ran under (None for
        round 0, the initial model, which releases nothing). The release staged for
        `round` in :attr:`releases` (:meth:`ReleaseLedger.stage`), if any, becomes part
        of the round too: its row is committed in the same transaction. So does
        `strategy_state`, ``(strategy name, state)`` (:mod:`~fedpriv.coordinator.strategy_state`).
        """
        path = self.checkpoint_path(round)
        started = time.perf_counter()
        try:
            temporary, digest = stage_checkpoint(path, model, key=self._key)
        except OSError as err:
            raise StoreError(f"cannot write checkpoint {path}: {err.strerror}") from err
        state = None
        if strategy_state is not None:
            name, tensors = strategy_state
            state = stage_state(self.checkpoints, round, name, tensors, self._key)
        return StagedRound(
            round=round,
            checkpoint=path,
            temporary=temporary,
            sha256=digest,
            started_unix_s=started_unix_s,
            selected=selected,
            accepted=accepted,
            total_weight=total_weight,
            metrics={source: dict(values) for source, values in (metrics or {}).items()},
            record_attempt=record_attempt,
            payload_bytes=model.layout.payload_bytes,
            write_s=time.perf_counter() - started,
            privacy=privacy,
            release=self.releases.take_staged(round),
            strategy_state=state,
        )

    def commit_staged(self, staged: StagedRound) -> CommittedRound:
        """Make a staged checkpoint durable, then commit its round in one transaction.

        Raises:
            StoreError: The checkpoint or the database could not be written; the
                round is not committed.
        """
        started = time.perf_counter()
        files = [(staged.temporary, staged.checkpoint)]
        if staged.strategy_state is not None:
            files.append((staged.strategy_state.temporary, staged.strategy_state.path))
        for temporary, path in files:
            try:
                publish(temporary, path)
            except OSError as err:
                raise StoreError(f"cannot write checkpoint {path}: {err.strerror}") from err
        published = time.perf_counter()
        reach(FaultPoint.AFTER_CHECKPOINT_BEFORE_SQL)
        round = staged.round
        row = (
            round,
            staged.started_unix_s,
            time.time(),
            staged.selected,
            staged.accepted,
            staged.total_weight,
            str(staged.checkpoint.relative_to(self.directory)),
            staged.sha256,
        )
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.execute(
                        "INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row
                    )
                    for source, values in staged.metrics.items():
                        self._db.executemany(
                            "INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)",
                            _numeric_rows(round, source, values),
                        )
                    if staged.record_attempt:
                        self._db.execute(_INSERT_ATTEMPT, (*row[:3], "completed", ""))
                    if staged.privacy is not None:
                        record_round_privacy(self._db, round, staged.privacy)
                    if staged.release is not None:
                        insert_release(self._db, staged.release)
                    if staged.strategy_state is not None:
                        insert_state(self._db, self.directory, staged.strategy_state)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
        except sqlite3.Error as err:
            raise StoreError(f"cannot commit round {round}: {err}") from err
        logger.info(
            "committed round=%d checkpoint_bytes=%d write_s=%.3f fsync_s=%.3f database_s=%.3f",
            round,
            staged.payload_bytes,
            staged.write_s,
            published - started,
            time.perf_counter() - published,
        )
        self.prune_checkpoints(round)
        if staged.strategy_state is not None:
            prune_states(self.checkpoints, round)
        return CommittedRound(round=round, checkpoint=staged.checkpoint, sha256=staged.sha256)

    def record_attempt(
        self, *, round: int, started_unix_s: float, outcome: str, detail: str
    ) -> None:
        """Record how an attempt at a round ended (completed or failed, and why)."""
        self._write(_INSERT_ATTEMPT, (round, started_unix_s, time.time(), outcome, detail))

    def record_participant(
        self,
        *,
        round: int,
        task: str,
        silo: str,
        outcome: str,
        num_examples: int = 0,
        bytes_received: int = 0,
        detail: str = "",
    ) -> None:
        """Record one silo's result for one task (accepted, rejected, dropped, ...)."""
        self._write(
            "INSERT INTO participants (round, task, silo, outcome, num_examples, bytes_received,"
            " detail, unix_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (round, task, silo, outcome, num_examples, bytes_received, detail, time.time()),
        )

    def record_metrics(self, *, round: int, source: str, values: Mapping[str, Scalar]) -> None:
        """Store the numeric entries of `values` for `round` under `source`."""
        numeric = _numeric_rows(round, source, values)
        try:
            with self._lock:
                self._db.executemany("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)", numeric)
        except sqlite3.Error as err:
            raise StoreError(f"cannot write metrics: {err}") from err

    def touch_silo(self, silo: str) -> None:
        """Record that `silo` was seen now."""
        now = time.time()
        self._write(
            "INSERT INTO silos VALUES (?, ?, ?) "
            "ON CONFLICT(silo) DO UPDATE SET last_seen_unix_s = excluded.last_seen_unix_s",
            (silo, now, now),
        )

    def metrics(self, *, source: str | None = None) -> Iterator[tuple[int, str, str, float]]:
        """Yield stored ``(round, source, name, value)`` rows in round order."""
        with self._lock:
            if source is None:
                rows = self._db.execute("SELECT * FROM metrics ORDER BY round, source, name")
            else:
                rows = self._db.execute(
                    "SELECT * FROM metrics WHERE source = ? ORDER BY round, name", (source,)
                )
            fetched = rows.fetchall()
        yield from fetched

    def participants(self, round: int) -> list[tuple[str, str, str, str]]:
        """``(task, silo, outcome, detail)`` rows recorded for `round`."""
        with self._lock:
            return self._db.execute(
                "SELECT task, silo, outcome, detail FROM participants WHERE round = ? ORDER BY id",
                (round,),
            ).fetchall()

    def rounds(self) -> list[int]:
        """Committed rounds, ascending."""
        with self._lock:
            return [r for (r,) in self._db.execute("SELECT round FROM rounds ORDER BY round")]

    def round_privacy(self) -> dict[int, RoundPrivacy]:
        """Which silo-level DP each committed round (1, 2, ...) ran under.

        See :func:`fedpriv.coordinator.privacy_record.round_privacy`.
        """
        with self._lock:
            return round_privacy(self._db)

    def silo_spends(self) -> dict[str, SiloSpend]:
        """Each silo's epsilon and delta as last reported in a committed round."""
        with self._lock:
            return silo_spends(self._db)

    def discarded_updates(self) -> list[DiscardedUpdate]:
        """Accepted updates that failed attempts threw away (their spend bought nothing)."""
        with self._lock:
            return discarded_updates(self._db)
