"""The parts of the limits: refusal log, stream slots, guarded deserializer, timed reads.

A rate-limited refusal log, per-identity stream slots, a deserializer that
never raises, and a request stream read with a timeout.

gRPC's sync server has no read with a timeout: a handler that calls
``next(request_iterator)`` on a stream that sends nothing blocks its worker
thread for good. :class:`TimedReader` reads the stream in a helper thread and
hands each message over; the handler waits for it with a timeout and, when it
expires, ends the call with DEADLINE_EXCEEDED. Ending the call completes the
helper's pending read, so both threads are freed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from fedpriv.errors import CallRefused, LimitExceeded, MalformedMessage, StreamCut, StreamStalled

__all__ = ["Refusal", "RefusalLog", "StreamSlots", "TimedReader", "guard_deserializer"]

logger = logging.getLogger(__name__)


class RefusalLog:
    """One WARNING line per identity per interval for refused calls; the rest are counted.

    Args:
        interval_s: Shortest time between two lines about the same identity.
        clock: Monotonic seconds (tests pass their own).
        max_identities: Identities tracked at once; beyond it the oldest are
            forgotten, so that self-declared names (--insecure) cannot grow it.
    """

    def __init__(
        self,
        *,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_identities: int = 4096,
    ) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._max = max_identities
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}

    def refused(self, identity: str, reason: str, detail: str) -> bool:
        """Note a refused call (`reason`: the limit or check); True if it was logged."""
        now = self._clock()
        with self._lock:
            last, suppressed = self._last.get(identity, (None, 0))
            if last is not None and now - last < self._interval_s:
                self._last[identity] = (last, suppressed + 1)
                return False
            self._last.pop(identity, None)
            if len(self._last) >= self._max:
                del self._last[next(iter(self._last))]
            self._last[identity] = (now, 0)
        logger.warning(
            "call ended identity=%s reason=%s suppressed=%d: %s",
            identity,
            reason,
            suppressed,
            detail,
        )
        return True


class StreamSlots:
    """Counts each identity's open streaming calls against a cap."""

    def __init__(self, per_identity: int) -> None:
        self._per_identity = per_identity
        self._cond = threading.Condition()
        self._open: dict[str, int] = {}

    def acquire(self, identity: str) -> bool:
        """Take a slot for `identity`; False when it already holds the cap."""
        with self._cond:
            held = self._open.get(identity, 0)
            if held >= self._per_identity:
                return False
            self._open[identity] = held + 1
            self._cond.notify_all()
            return True

    def release(self, identity: str) -> None:
        """Give back a slot that :meth:`acquire` granted."""
        with self._cond:
            held = self._open.get(identity, 0) - 1
            if held > 0:
                self._open[identity] = held
            else:
                self._open.pop(identity, None)
            self._cond.notify_all()

    def held(self, identity: str) -> int:
        """Slots `identity` holds now."""
        with self._cond:
            return self._open.get(identity, 0)

    def wait_for(self, identity: str, count: int, timeout_s: float) -> bool:
        """Wait until `identity` holds exactly `count` slots; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._open.get(identity, 0) == count, timeout_s)


@dataclass(frozen=True, slots=True)
class Refusal:
    """What a guarded deserializer returns instead of raising: the call is refused."""

    error: type[CallRefused]
    limit: str
    detail: str


def _is_chunk(message: Any) -> bool:
    # fedpriv's hand-framed chunks decode to a tuple, not a protobuf message; a peer's
    # generated code may still send chunks as ordinary messages with `chunk` set.
    fields = getattr(message, "ListFields", None)
    return fields is None or any(field.name == "chunk" for field, _ in fields())


def guard_deserializer(
    deserialize: Callable[[bytes], Any] | None, *, max_header_bytes: int
) -> Callable[[bytes], Any] | None:
    """Wrap a request deserializer so that it never raises and bounds non-chunk messages.

    gRPC logs a traceback at ERROR and answers INTERNAL when a deserializer
    raises; the wrapped one returns a refusal that the interceptor answers with
    INVALID_ARGUMENT (undecodable) or RESOURCE_EXHAUSTED (too large).
    """
    if deserialize is None:
        return None

    def guarded(data: bytes) -> Any:
        try:
            message = deserialize(data)
        except Exception as err:  # any decoding failure is the caller's, never ours
            return Refusal(
                MalformedMessage,
                "decoding",
                f"{len(data)} bytes that do not decode as this method's message "
                f"({type(err).__name__})",
            )
        if len(data) > max_header_bytes and not _is_chunk(message):
            return Refusal(
                LimitExceeded,
                "max_header_bytes",
                f"a {len(data)}-byte message; at most {max_header_bytes} bytes are allowed "
                "for anything but a tensor chunk (limits.max_header_bytes)",
            )
        return message

    return guarded


class TimedReader(Iterator[Any]):
    """A request stream read in a helper thread, each message awaited with a timeout.

    The helper reads the next message only when the handler asks for it, so no
    more than one message is in flight, as with the plain iterator.

    Args:
        source: gRPC's request iterator.
        first_timeout_s: Time the first message may take.
        idle_timeout_s: Time every later message may take.
        refuse: Builds (and logs) the error for a refusal.
    """

    def __init__(
        self,
        source: Iterator[Any],
        *,
        first_timeout_s: float,
        idle_timeout_s: float,
        refuse: Callable[[type[CallRefused], str, str], CallRefused],
    ) -> None:
        self._source = source
        self._first_timeout_s = first_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._refuse = refuse
        self._cond = threading.Condition()
        self._wanted = False
        self._closed = False
        self._ended = False
        self._result: tuple[str, Any] | None = None
        self._received = 0
        self._thread: threading.Thread | None = None

    def _read(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._wanted or self._closed)
                if self._closed:
                    return
                self._wanted = False
            try:
                result: tuple[str, Any] = ("message", next(self._source))
            except StopIteration:
                result = self._confirm_end()
            except BaseException as err:  # handed to the handler, which raises it
                result = ("error", err)
            with self._cond:
                self._result = result
                self._cond.notify_all()
            if result[0] != "message":
                return

    def _confirm_end(self) -> tuple[str, Any]:
        # gRPC also ends the iterator when it refuses a message (one over the size
        # limit) and cancels the call, and which of the two events it handles first
        # varies. Reading once more settles it: after a clean half-close the read
        # ends again at once; on a cancelled call it raises, since the cancellation
        # was queued before this read.
        try:
            next(self._source)
        except StopIteration:
            return ("end", None)
        except BaseException as err:  # the call was cut: handed to the handler
            return ("error", err)
        return ("error", MalformedMessage("a message arrived after the end of the stream"))

    def __next__(self) -> Any:
        with self._cond:
            if self._ended or self._closed:
                raise StopIteration
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._read, name="fedpriv-stream-read", daemon=True
                )
                self._thread.start()
            self._wanted = True
            self._cond.notify_all()
            first = self._received == 0
            timeout_s = self._first_timeout_s if first else self._idle_timeout_s
            result = self._cond.wait_for(lambda: self._result, timeout_s)
            if result is None:
                self._closed = True
                self._cond.notify_all()
                what = "no first message" if first else f"nothing after message {self._received}"
                setting = "header_timeout_s" if first else "idle_timeout_s"
                raise self._refuse(
                    StreamStalled,
                    setting,
                    f"{what} in {timeout_s:g} s (limits.{setting}); the stream was ended",
                )
            kind, value = result
            self._result = None
        if kind == "end":
            self._ended = True
            raise StopIteration
        if kind == "error":
            self._ended = True
            if isinstance(value, grpc.RpcError):  # the call was cancelled: no traceback
                raise self._refuse(
                    StreamCut,
                    "stream_cut",
                    f"the stream was cut after {self._received} messages (cancelled by the "
                    "caller, or a message over gRPC's size limit)",
                )
            raise value
        self._received += 1
        if isinstance(value, Refusal):
            self.close()
            raise self._refuse(value.error, value.limit, value.detail)
        return value

    def close(self) -> None:
        """Stop the helper once its pending read (if any) returns."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
