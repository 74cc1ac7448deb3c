"""The session registry: one session per identity, with an injected clock."""

from __future__ import annotations

import pytest

from fedpriv.coordinator import Store
from fedpriv.coordinator.audit import AuditKind
from fedpriv.coordinator.sessions import SessionRegistry
from fedpriv.errors import DuplicateSession, ProtocolError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path)
    yield store
    store.close()


def registry(store, clock, activity=None):
    activity = activity if activity is not None else {}
    return SessionRegistry(
        liveness_s=30.0, clock=clock, audit=store.audit, last_activity=activity.get
    )


def kinds(store):
    return [(e.kind, e.peer) for e in store.audit.entries()]


def test_a_second_session_is_refused_while_the_first_is_in_a_call(store):
    # Arrange: the first session has a call open (a long-poll, an upload)
    clock = Clock()
    sessions = registry(store, clock)
    release = sessions.claim("silo-a", session="id:1", peer="ipv4:10.0.0.1:1")
    # Act / Assert: refused, and the holder keeps the identity
    clock.now += 29.0
    with pytest.raises(DuplicateSession, match="'silo-a' already has a live session") as caught:
        sessions.claim("silo-a", session="id:2", peer="ipv4:10.0.0.2:2")
    assert sessions.peer("silo-a") == "ipv4:10.0.0.1:1" and sessions.open_calls("silo-a") == 1
    assert "is in a call" in str(caught.value) and isinstance(caught.value, ProtocolError)
    # The refusal does not tell the caller the holder's address; the audit log does.
    assert "10.0.0.1" not in str(caught.value)
    ((kind, peer),) = kinds(store)
    assert kind is AuditKind.DUPLICATE and peer == "ipv4:10.0.0.2:2"
    assert "ipv4:10.0.0.1:1" in store.audit.entries()[0].detail
    release()
    release()  # idempotent
    assert sessions.open_calls("silo-a") == 0


def test_a_session_without_an_open_call_is_taken_over_and_cannot_take_it_back(store):
    # Arrange: a silo that crashed between calls
    clock = Clock()
    sessions = registry(store, clock)
    sessions.claim("silo-a", session="id:1", peer="p1")()
    # Act: its restarted process calls
    restarted = sessions.claim("silo-a", session="id:2", peer="p2")
    restarted()
    # Assert: it holds the identity; the old session stays refused while it is live
    assert sessions.peer("silo-a") == "p2"
    with pytest.raises(DuplicateSession, match="took this identity over from this session"):
        sessions.claim("silo-a", session="id:1", peer="p1")
    # ...a third session takes over from the second, and neither earlier one may return
    sessions.claim("silo-a", session="id:3", peer="p3")()
    for old in ("id:1", "id:2"):
        with pytest.raises(DuplicateSession):
            sessions.claim("silo-a", session=old, peer="p")
    assert [k for k, _ in kinds(store)] == [
        AuditKind.TAKEOVER,
        AuditKind.DUPLICATE,
        AuditKind.TAKEOVER,
        AuditKind.DUPLICATE,
        AuditKind.DUPLICATE,
    ]
    # Once the holder is silent past the window, anyone may hold it again.
    clock.now += 31.0
    sessions.claim("silo-a", session="id:1", peer="p1")()
    assert sessions.peer("silo-a") == "p1"


def test_the_same_session_from_a_new_port_is_one_session(store):
    clock = Clock()
    sessions = registry(store, clock)
    sessions.claim("silo-a", session="id:1", peer="ipv4:10.0.0.1:1")
    sessions.claim("silo-a", session="id:1", peer="ipv4:10.0.0.1:9")  # reconnected
    assert sessions.peer("silo-a") == "ipv4:10.0.0.1:9" and sessions.open_calls("silo-a") == 2
    with pytest.raises(DuplicateSession):
        sessions.claim("silo-a", session="id:2", peer="ipv4:10.0.0.1:10")


def test_activity_the_federation_saw_keeps_a_session_in_a_call_live(store):
    # Arrange: a long upload streams chunks, with no other call
    clock = Clock()
    activity: dict[str, float] = {}
    sessions = registry(store, clock, activity)
    sessions.claim("silo-a", session="id:1", peer="p1")
    clock.now += 100.0
    activity["silo-a"] = clock.now - 1.0
    # Act / Assert
    with pytest.raises(DuplicateSession):
        sessions.claim("silo-a", session="id:2", peer="p2")
    # ...while a call stuck for longer than the window gives the identity up
    activity["silo-a"] = clock.now - 31.0
    sessions.claim("silo-a", session="id:2", peer="p2")
    assert sessions.peer("silo-a") == "p2"


def test_ending_a_session_frees_the_identity_and_its_late_releases_count_nothing(store):
    # Arrange: silo-a's call is open when it ends (left, or its upload broke off)
    clock = Clock()
    sessions = registry(store, clock)
    late = sessions.claim("silo-a", session="id:1", peer="p1")
    sessions.claim("silo-b", session="id:2", peer="p2")
    sessions.end("silo-a")
    # Act: the same session comes back with a call open, then the old call ends
    sessions.claim("silo-a", session="id:1", peer="p3")
    late()
    # Assert: the new call is still counted, so a newcomer is refused
    assert sessions.open_calls("silo-a") == 1
    with pytest.raises(DuplicateSession):
        sessions.claim("silo-a", session="id:9", peer="p9")
    assert (sessions.peer("silo-a"), sessions.peer("silo-b"), sessions.peer("nobody")) == (
        "p3",
        "p2",
        "",
    )
