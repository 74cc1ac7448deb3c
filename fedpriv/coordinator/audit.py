"""The coordinator's audit log: who joined, left, was refused or asked what, and from where.

One table, ``audit_log``, in the coordinator's SQLite database (``state.sqlite3``),
written like the rest of the store: each entry is its own transaction, durable
(``synchronous=FULL``) before :meth:`AuditLog.record` returns, so an entry is
never lost to a crash once the event it records has had an effect. Entries are
only ever appended.

Every entry has a time (Unix seconds), an :class:`AuditKind`, the caller's
authenticated identity (the certificate's common name), its peer address as
gRPC reports it (``ipv4:10.0.0.7:51234``) and a free-text detail (the reason
of a rejection or a denial, the Admin method called). Detail and identity are
cut to bounded lengths: the log holds no update bytes, keys or shares.

``fedpriv audit-log STATE_DIR`` prints the entries; :meth:`AuditLog.open`
reads them without a running coordinator.
"""

from __future__ import annotations

import enum
import logging
import pathlib
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedpriv.errors import StoreError

__all__ = ["AUDIT_SCHEMA", "AuditEntry", "AuditKind", "AuditLog", "DenialRecorder"]

logger = logging.getLogger(__name__)

# Created with the store's other tables (CREATE ... IF NOT EXISTS): a state folder
# from before the audit log gets the table, empty, the first time it is opened.
AUDIT_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    unix_s REAL NOT NULL,
    kind TEXT NOT NULL,
    identity TEXT NOT NULL,
    peer TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_identity ON audit_log (identity, id);
"""

# Identities come from certificates and peers from gRPC; the bounds keep a hostile
# caller from writing megabytes per entry.
_MAX_IDENTITY = 256
_MAX_PEER = 256
_MAX_DETAIL = 2000


class AuditKind(enum.Enum):
    """What an audit entry records."""

    JOIN = "join"
    """A silo joined (or joined again after a reconnect or a restart)."""
    LEAVE = "leave"
    """A silo left; the detail is the reason it gave."""
    GONE = "gone"
    """A silo's upload broke off (cancelled or disconnected): it counts as gone."""
    REJECTED = "rejected"
    """An update or result failed validation; the detail lists the problems."""
    DUPLICATE = "duplicate"
    """A second session for an identity with a live one was refused."""
    TAKEOVER = "takeover"
    """A new session took over an identity whose session had no call open (a restart)."""
    DENIED = "denied"
    """The authorisation check refused a call (not allowed, revoked, not an operator)."""
    ADMIN = "admin"
    """An operator called the Admin service; the detail is the method."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEntry:
    """One row of the audit log."""

    id: int
    unix_s: float
    kind: AuditKind
    identity: str
    peer: str
    detail: str


def _bounded(value: str, limit: int) -> str:
    """`value` cut to `limit` characters, with control characters escaped.

    A caller controls its sdk version and reasons: escaping keeps it from
    forging lines in ``fedpriv audit-log``'s output.
    """
    if not value.isprintable():
        value = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in value)
    return value if len(value) <= limit else value[: limit - 1] + "…"


class AuditLog:
    """Append-only audit entries in a coordinator's SQLite database (thread-safe).

    The store makes one (``Store.audit``) on its own connection and lock; use
    :meth:`open` to read a state folder's log from another process.

    Args:
        db: An open connection in autocommit mode (``isolation_level=None``)
            whose database has the :data:`AUDIT_SCHEMA` tables.
        lock: Held around every use of `db` (shared with the store).
        clock: Wall-clock Unix seconds for each entry (injectable for tests).
    """

    def __init__(
        self,
        db: sqlite3.Connection,
        lock: threading.Lock,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._lock = lock
        self._clock = clock

    @classmethod
    def open(cls, state_dir: pathlib.Path) -> AuditLog:
        """Open the audit log of the coordinator state in `state_dir`, read-only.

        Safe while the coordinator runs (the database is in WAL mode).

        Raises:
            StoreError: `state_dir` holds no coordinator state, or it cannot be read.
        """
        path = state_dir / "state.sqlite3"
        if not path.is_file():
            raise StoreError(
                f"{path} does not exist: point at a coordinator's state folder "
                "([store] dir in coordinator.toml)"
            )
        try:
            db = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro",
                uri=True,
                check_same_thread=False,
                isolation_level=None,
            )
        except sqlite3.Error as err:
            raise StoreError(f"cannot open {path}: {err}") from err
        return cls(db, threading.Lock())

    def close(self) -> None:
        """Close the connection (only for a log made by :meth:`open`)."""
        with self._lock:
            self._db.close()

    def record(self, kind: AuditKind, identity: str, peer: str, detail: str = "") -> None:
        """Append one entry; it is durable when this returns.

        Args:
            kind: What happened.
            identity: The caller's authenticated identity ("" if it has none).
            peer: The caller's address as gRPC reports it ("" if unknown).
            detail: Reason, problems or method; cut to 2,000 characters.

        Raises:
            StoreError: The entry could not be written.
        """
        row = (
            self._clock(),
            kind.value,
            _bounded(identity, _MAX_IDENTITY),
            _bounded(peer, _MAX_PEER),
            _bounded(detail, _MAX_DETAIL),
        )
        try:
            with self._lock:
                self._db.execute(
                    "INSERT INTO audit_log (unix_s, kind, identity, peer, detail) "
                    "VALUES (?, ?, ?, ?, ?)",
                    row,
                )
        except sqlite3.Error as err:
            raise StoreError(f"cannot write the audit log: {err}") from err

    def record_denied(self, identity: str, peer: str, reason: str) -> None:
        """Append a :attr:`AuditKind.DENIED` entry.

        Raises:
            StoreError: The entry could not be written.
        """
        self.record(AuditKind.DENIED, identity, peer, reason)

    def entries(
        self,
        *,
        identity: str | None = None,
        kinds: frozenset[AuditKind] | None = None,
        since_unix_s: float | None = None,
        limit: int | None = None,
    ) -> list[AuditEntry]:
        """Entries in the order they were written, optionally filtered.

        Args:
            identity: Only this identity's entries.
            kinds: Only entries of these kinds.
            since_unix_s: Only entries at or after this time.
            limit: Only the newest `limit` matching entries (still oldest first).

        Raises:
            StoreError: The log could not be read, or holds a kind this version
                does not know.
        """
        clauses: list[str] = []
        params: list[object] = []
        if identity is not None:
            clauses.append("identity = ?")
            params.append(identity)
        if kinds is not None:
            clauses.append(f"kind IN ({', '.join('?' * len(kinds))})")
            params += sorted(kind.value for kind in kinds)
        if since_unix_s is not None:
            clauses.append("unix_s >= ?")
            params.append(since_unix_s)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT id, unix_s, kind, identity, peer, detail FROM audit_log{where} ORDER BY id"
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit must be >= 1, not {limit}")
            sql = f"SELECT * FROM ({sql} DESC LIMIT {int(limit)}) ORDER BY id"
        try:
            with self._lock:
                rows = self._db.execute(sql, params).fetchall()
        except sqlite3.OperationalError as err:
            if "no such table" in str(err):  # a state folder from before the audit log
                return []
            raise StoreError(f"cannot read the audit log: {err}") from err
        except sqlite3.Error as err:
            raise StoreError(f"cannot read the audit log: {err}") from err
        entries = []
        for id, unix_s, kind, who, peer, detail in rows:
            try:
                parsed = AuditKind(kind)
            except ValueError:
                raise StoreError(
                    f"audit entry {id} has kind {kind!r}, unknown to this fedpriv version"
                ) from None
            entries.append(
                AuditEntry(
                    id=id, unix_s=unix_s, kind=parsed, identity=who, peer=peer, detail=detail
                )
            )
        return entries


class DenialRecorder:
    """The authorisation interceptor's ``on_denied`` hook: refusals into the audit log.

    Each refusal would otherwise cost one durable write on the caller's gRPC
    thread, so a holder of a revoked key could flood the disk and slow the
    server with calls it knows will fail. The first refusal of an identity for
    a reason is written at once; further ones within `interval_s` are counted
    and folded into the next entry's detail ("... 41 more since the last entry").

    Args:
        audit: Where the entries go.
        interval_s: Least time between two entries for one identity and reason.
        clock: Monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        audit: AuditLog,
        *,
        interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._audit = audit
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        # (identity, reason) -> (time of the last entry, refusals not written since)
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def __call__(self, identity: str | None, peer: str, reason: object) -> None:
        """Record one refusal (`reason` is a ``DenialReason`` or its text)."""
        text = str(getattr(reason, "value", reason))
        key = (identity or "", text)
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last[0] < self._interval_s:
                self._last[key] = (last[0], last[1] + 1)
                return
            if len(self._last) > 10_000:
                # Bounded: anonymous peers cannot grow the table without end.
                self._last.clear()
            suppressed = 0 if last is None else last[1]
            self._last[key] = (now, 0)
        detail = text if not suppressed else f"{text} ({suppressed} more since the last entry)"
        try:
            self._audit.record_denied(identity or "", peer, detail)
        except StoreError as err:
            logger.error("audit log: %s", err)
