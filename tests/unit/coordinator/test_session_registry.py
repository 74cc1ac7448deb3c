"""The session registry: one live session per identity, with an injected clock."""

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


def test_a_second_session_is_refused_while_the_first_is_live_and_admitted_after(store):
    # Arrange
    clock = Clock()
    sessions = registry(store, clock)
    sessions.claim("silo-a", session="id:1", peer="ipv4:10.0.0.1:1")
    # Act / Assert: refused within the window, whatever it tries
    clock.now += 29.0
    with pytest.raises(DuplicateSession, match="'silo-a' already has a live session") as caught:
        sessions.claim("silo-a", session="id:2", peer="ipv4:10.0.0.2:2")
    assert sessions.peer("silo-a") == "ipv4:10.0.0.1:1"
    # ...and admitted once the first has been silent for longer than the window
    clock.now += 1.5
    sessions.claim("silo-a", session="id:2", peer="ipv4:10.0.0.2:2")
    assert sessions.peer("silo-a") == "ipv4:10.0.0.2:2"
    with pytest.raises(DuplicateSession):
        sessions.claim("silo-a", session="id:1", peer="ipv4:10.0.0.1:1")
    # The refusal names neither key nor the holder's address; the audit log does.
    assert "10.0.0.1" not in str(caught.value) and isinstance(caught.value, ProtocolError)
    (first, second) = store.audit.entries(kinds=frozenset({AuditKind.DUPLICATE}))
    assert first.identity == "silo-a" and first.peer == "ipv4:10.0.0.2:2"
    assert "ipv4:10.0.0.1:1" in first.detail and "ipv4:10.0.0.2:2" in second.detail


def test_the_same_session_from_a_new_port_is_one_session(store):
    clock = Clock()
    sessions = registry(store, clock)
    sessions.claim("silo-a", session="id:1", peer="ipv4:10.0.0.1:1")
    sessions.claim("silo-a", session="id:1", peer="ipv4:10.0.0.1:9")  # reconnected
    assert sessions.peer("silo-a") == "ipv4:10.0.0.1:9"
    with pytest.raises(DuplicateSession):
        sessions.claim("silo-a", session="id:2", peer="ipv4:10.0.0.1:10")


def test_activity_the_federation_saw_keeps_a_session_live(store):
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


def test_ending_a_session_frees_the_identity_at_once_and_other_identities_are_apart(store):
    clock = Clock()
    sessions = registry(store, clock)
    sessions.claim("silo-a", session="id:1", peer="p1")
    sessions.claim("silo-b", session="id:2", peer="p2")
    sessions.end("silo-a")
    sessions.claim("silo-a", session="id:3", peer="p3")
    assert (sessions.peer("silo-a"), sessions.peer("silo-b"), sessions.peer("nobody")) == (
        "p3",
        "p2",
        "",
    )
