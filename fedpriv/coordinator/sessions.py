"""One live session per identity: a second connection under a live identity is refused.

A session is what one running silo presents: its session id (``fedpriv-session``
metadata, see :mod:`fedpriv.transport.session`) or, without one, its peer
address. The first session to call under an identity holds it while it is
live, that is while it called (or streamed a chunk) within the liveness
window. Every Fleet call of another session under that identity fails with
:class:`~fedpriv.errors.DuplicateSession` (``ALREADY_EXISTS``) and an audit
entry, and changes nothing: it cannot pull the holder's task, upload for it,
heartbeat for it or make it leave.

The holder gives the identity up when it leaves, when its upload breaks off
(:meth:`SessionRegistry.end`), or when it falls silent for the liveness window;
the next session to call then holds it. A silo restarted after a crash is
therefore admitted at once if it was killed mid-upload, and after at most
the liveness window otherwise.

Refusing the second session, rather than letting it replace the first, keeps
the live silo's task and upload: a process that copied the certificate can
neither take over nor undo an honest silo's round.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from fedpriv.coordinator.audit import AuditKind, AuditLog
from fedpriv.errors import DuplicateSession

__all__ = ["SessionRegistry"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Session:
    key: str
    peer: str
    started: float
    last_call: float


class SessionRegistry:
    """Which session holds each identity (thread-safe).

    Args:
        liveness_s: A session silent this long gives its identity up.
        clock: Monotonic seconds (the federation's, injectable for tests).
        audit: Where refusals are recorded.
        last_activity: The identity's latest activity the federation saw
            (chunks of a long upload count), or None.
    """

    def __init__(
        self,
        *,
        liveness_s: float,
        clock: Callable[[], float],
        audit: AuditLog,
        last_activity: Callable[[str], float | None] = lambda identity: None,
    ) -> None:
        self._liveness_s = liveness_s
        self._clock = clock
        self._audit = audit
        self._last_activity = last_activity
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}

    def claim(self, identity: str, *, session: str, peer: str) -> None:
        """Note a call of `session` (from `peer`) under `identity`; refuse a duplicate.

        Raises:
            DuplicateSession: Another session holds `identity` and is live.
        """
        now = self._clock()
        with self._lock:
            held = self._sessions.get(identity)
            if held is not None and held.key == session:
                held.last_call = now
                held.peer = peer  # a reconnect of the same session comes from a new port
                return
            if held is not None:
                activity = max(held.last_call, self._last_activity(identity) or held.last_call)
                silent_s = now - activity
                if silent_s <= self._liveness_s:
                    holder, since_s = held.peer, now - held.started
                    refused = True
                else:
                    logger.info(
                        "session silo=%s peer=%s replaces one silent for %.0f s (peer=%s)",
                        identity,
                        peer,
                        silent_s,
                        held.peer,
                    )
                    refused = False
            else:
                refused = False
            if not refused:
                self._sessions[identity] = _Session(
                    key=session, peer=peer, started=now, last_call=now
                )
                return
        logger.warning(
            "refused silo=%s peer=%s reason=duplicate-session holder=%s", identity, peer, holder
        )
        self._audit.record(
            AuditKind.DUPLICATE,
            identity,
            peer,
            f"refused: the identity has a live session from {holder}, "
            f"started {since_s:.1f} s ago, last active {silent_s:.1f} s ago",
        )
        # The holder's address is not told to the caller, which may be an impostor.
        raise DuplicateSession(
            f"silo {identity!r} already has a live session (started {since_s:.0f} s ago, "
            f"active {silent_s:.0f} s ago), so this connection is refused: a round counts "
            "each identity once. Another process is using this certificate; stop it. A silo "
            "restarted after a crash is admitted once the old session leaves, breaks off "
            f"an upload or stays silent for {self._liveness_s:.0f} s"
        )

    def peer(self, identity: str) -> str:
        """The peer address of the session holding `identity` ("" if none)."""
        with self._lock:
            held = self._sessions.get(identity)
            return held.peer if held is not None else ""

    def end(self, identity: str) -> None:
        """Free `identity`: its session left or broke off; the next caller holds it."""
        with self._lock:
            self._sessions.pop(identity, None)
