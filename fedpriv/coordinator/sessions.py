"""One session per identity: which connection may speak for a silo now.

A session is what one running silo presents: its session id (``fedpriv-session``
metadata, see :mod:`fedpriv.transport.session`) or, without one, its peer
address. The rules, for a call of session S under identity I held by session H:

- S is H: the call goes ahead.
- H is silent (no call, no streamed chunk) for longer than the liveness window,
  or H left, or its upload broke off (:meth:`SessionRegistry.end`): S holds I.
- H has no call open (no long-poll, upload or secure-aggregation step in
  progress): S takes I over. This is a silo restarted after a crash, whose old
  calls ended with its connection; it picks up its task at once. H was never
  interrupted: an open upload is an open call.
- Otherwise (H is in a call), or if H took I over from S: the call fails with
  :class:`~fedpriv.errors.DuplicateSession` (``ALREADY_EXISTS``) and changes
  nothing. S cannot pull H's task, upload for it, heartbeat for it or make it
  leave. A session that was taken over stays refused while the newer one is
  live, so two live processes under one certificate do not take turns: one
  works, the other is told why it cannot.

Either way the rounds take one result per identity and task, so an identity
is never summed twice. Refusals and takeovers are written to the audit log.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from fedpriv.coordinator.audit import AuditKind, AuditLog
from fedpriv.errors import DuplicateSession

__all__ = ["SessionRegistry"]

logger = logging.getLogger(__name__)

# Sessions a holder took over (directly or before it), refused while it is live.
_KEEP_REPLACED = 16


@dataclass(slots=True)
class _Session:
    key: str
    peer: str
    started: float
    last_call: float
    open_calls: int = 0
    replaced: list[str] = field(default_factory=list)


class SessionRegistry:
    """Which session holds each identity (thread-safe).

    Args:
        liveness_s: A session silent this long gives its identity up.
        clock: Monotonic seconds (the federation's, injectable for tests).
        audit: Where refusals and takeovers are recorded.
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
        # Notified whenever a call starts or ends (tests wait on it).
        self.changed = threading.Condition()
        self._sessions: dict[str, _Session] = {}

    def claim(self, identity: str, *, session: str, peer: str) -> Callable[[], None]:
        """Start a call of `session` (from `peer`) under `identity`, or refuse it.

        Returns:
            Call it once the call has ended (any number of times).

        Raises:
            DuplicateSession: Another session holds `identity` and is in a call,
                or took it over from `session`, and is live.
        """
        now = self._clock()
        with self.changed:
            held = self._sessions.get(identity)
            if held is not None and held.key == session:
                held.last_call = now
                held.peer = peer  # a reconnect of the same session comes from a new port
                return self._open(identity, held)
            if held is None:
                return self._open(identity, self._bind(identity, session, peer, now))
            activity = max(held.last_call, self._last_activity(identity) or held.last_call)
            silent_s, since_s = now - activity, now - held.started
            taken_from_caller = session in held.replaced
            if silent_s > self._liveness_s:
                logger.info(
                    "session silo=%s peer=%s replaces one silent for %.0f s (peer=%s)",
                    identity,
                    peer,
                    silent_s,
                    held.peer,
                )
                return self._open(identity, self._bind(identity, session, peer, now))
            if held.open_calls == 0 and not taken_from_caller:
                bound = self._bind(identity, session, peer, now)
                bound.replaced = (held.replaced + [held.key])[-_KEEP_REPLACED:]
                release = self._open(identity, bound)
                previous = held.peer
            else:
                release = None
                previous = held.peer
        if release is not None:
            logger.warning(
                "session silo=%s peer=%s took over from peer=%s (no call open there)",
                identity,
                peer,
                previous,
            )
            try:
                self._audit.record(
                    AuditKind.TAKEOVER,
                    identity,
                    peer,
                    f"took over from the session at {previous} (no call open there, "
                    f"active {silent_s:.1f} s ago)",
                )
            except BaseException:
                release()  # the call fails: it must not stay counted as open
                raise
            return release
        why = "took this identity over from this session" if taken_from_caller else "is in a call"
        logger.warning(
            "refused silo=%s peer=%s reason=duplicate-session holder=%s", identity, peer, previous
        )
        self._audit.record(
            AuditKind.DUPLICATE,
            identity,
            peer,
            f"refused: the live session from {previous} {why} "
            f"(started {since_s:.1f} s ago, active {silent_s:.1f} s ago)",
        )
        # The holder's address is not told to the caller, which may be an impostor.
        raise DuplicateSession(
            f"silo {identity!r} already has a live session, which {why}, so this "
            "connection is refused: a round counts each identity once. If another "
            "process is using this certificate, stop one of them. Retry once the "
            f"other session leaves or stays silent for {self._liveness_s:.0f} s"
        )

    def _bind(self, identity: str, session: str, peer: str, now: float) -> _Session:
        bound = _Session(key=session, peer=peer, started=now, last_call=now)
        self._sessions[identity] = bound
        return bound

    def _open(self, identity: str, held: _Session) -> Callable[[], None]:
        """Count one open call of `held` (caller holds the lock); return its release."""
        held.open_calls += 1
        self.changed.notify_all()
        done = [False]

        def release() -> None:
            with self.changed:
                if done[0]:
                    return
                done[0] = True
                # Only the session object that counted the call: after end() and a
                # new claim with the same key, an old call must not be uncounted.
                if self._sessions.get(identity) is held and held.open_calls > 0:
                    held.open_calls -= 1
                self.changed.notify_all()

        return release

    def open_calls(self, identity: str) -> int:
        """Calls in progress of the session holding `identity` (0 if none)."""
        with self.changed:
            held = self._sessions.get(identity)
            return held.open_calls if held is not None else 0

    def peer(self, identity: str) -> str:
        """The peer address of the session holding `identity` ("" if none)."""
        with self.changed:
            held = self._sessions.get(identity)
            return held.peer if held is not None else ""

    def end(self, identity: str) -> None:
        """Free `identity`: its session left or broke off; the next caller holds it."""
        with self.changed:
            self._sessions.pop(identity, None)
            self.changed.notify_all()
