"""The audit log table: real SQLite, durable across reopening, filtered queries."""

from __future__ import annotations

import sqlite3

import pytest

from fedpriv.coordinator import Store
from fedpriv.coordinator.audit import AuditKind, AuditLog
from fedpriv.errors import StoreError


def test_entries_survive_reopening_the_store_with_time_identity_peer_kind_and_detail(tmp_path):
    # Arrange
    store = Store(tmp_path)
    store.audit.record(AuditKind.JOIN, "silo-a", "ipv4:10.0.0.7:51234", "sdk 0.1")
    store.audit.record(AuditKind.REJECTED, "silo-b", "ipv6:[::1]:4000", "w: 3 NaN values")
    store.audit.record_denied("silo-x", "ipv4:10.0.0.9:1", "certificate serial 0x1f is revoked")
    store.close()
    # Act
    reopened = Store(tmp_path)
    entries = reopened.audit.entries()
    reopened.close()
    # Assert
    assert [(e.kind, e.identity, e.peer, e.detail) for e in entries] == [
        (AuditKind.JOIN, "silo-a", "ipv4:10.0.0.7:51234", "sdk 0.1"),
        (AuditKind.REJECTED, "silo-b", "ipv6:[::1]:4000", "w: 3 NaN values"),
        (AuditKind.DENIED, "silo-x", "ipv4:10.0.0.9:1", "certificate serial 0x1f is revoked"),
    ]
    assert entries[0].unix_s <= entries[1].unix_s <= entries[2].unix_s
    assert entries[0].id < entries[1].id < entries[2].id


def test_entries_filter_by_identity_kind_time_and_keep_the_newest_within_a_limit(tmp_path):
    # Arrange: an injected clock gives each entry its own second
    store = Store(tmp_path)
    ticks = iter(range(100, 200))
    log = AuditLog(store._db, store._lock, clock=lambda: float(next(ticks)))
    for silo in ("silo-a", "silo-b", "silo-a", "silo-a"):
        log.record(AuditKind.JOIN, silo, "ipv4:127.0.0.1:1")
    log.record(AuditKind.LEAVE, "silo-a", "ipv4:127.0.0.1:1", "stopped")
    log.record(AuditKind.ADMIN, "operator", "ipv4:127.0.0.1:2", "Admin.Status")
    # Act / Assert
    assert [e.identity for e in log.entries(identity="silo-b")] == ["silo-b"]
    assert [e.kind for e in log.entries(identity="silo-a")] == [AuditKind.JOIN] * 3 + [
        AuditKind.LEAVE
    ]
    assert [e.detail for e in log.entries(kinds=frozenset({AuditKind.LEAVE, AuditKind.ADMIN}))] == [
        "stopped",
        "Admin.Status",
    ]
    assert [e.unix_s for e in log.entries(since_unix_s=103.0)] == [103.0, 104.0, 105.0]
    assert [e.unix_s for e in log.entries(limit=2)] == [104.0, 105.0]
    assert log.entries(identity="silo-a", kinds=frozenset({AuditKind.ADMIN})) == []
    with pytest.raises(ValueError, match="limit"):
        log.entries(limit=0)
    store.close()


def test_a_hostile_detail_is_bounded_and_stored_as_text(tmp_path):
    store = Store(tmp_path)
    store.audit.record(
        AuditKind.REJECTED, "x" * 10_000, "p" * 10_000, "'); DROP TABLE audit_log;--" * 500
    )
    (entry,) = store.audit.entries()
    store.close()
    assert len(entry.identity) == 256 and len(entry.peer) == 256 and len(entry.detail) == 2000
    assert entry.detail.startswith("'); DROP TABLE audit_log;--")


def test_the_read_only_view_sees_a_running_stores_entries_and_cannot_write(tmp_path):
    # Arrange: the coordinator's store stays open, as while it runs
    store = Store(tmp_path)
    store.audit.record(AuditKind.JOIN, "silo-a", "ipv4:127.0.0.1:1")
    reader = AuditLog.open(tmp_path)
    # Act
    seen = [e.identity for e in reader.entries()]
    store.audit.record(AuditKind.LEAVE, "silo-a", "ipv4:127.0.0.1:1", "stopped")
    seen_later = [e.kind for e in reader.entries()]
    # Assert
    assert seen == ["silo-a"] and seen_later == [AuditKind.JOIN, AuditKind.LEAVE]
    with pytest.raises(StoreError, match="cannot write the audit log"):
        reader.record(AuditKind.JOIN, "intruder", "ipv4:127.0.0.1:9")
    reader.close()
    store.close()


def test_opening_a_folder_without_coordinator_state_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist: point at a coordinator's state"):
        AuditLog.open(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_a_state_folder_from_before_the_audit_log_reads_as_empty_and_gets_the_table(tmp_path):
    # Arrange: a database with the store's older tables only
    db = sqlite3.connect(tmp_path / "state.sqlite3")
    db.execute("CREATE TABLE rounds (round INTEGER PRIMARY KEY)")
    db.commit()
    db.close()
    # Act / Assert: reading it is empty, opening the store adds the table
    old = AuditLog.open(tmp_path)
    assert old.entries() == []
    old.close()
    store = Store(tmp_path)
    store.audit.record(AuditKind.JOIN, "silo-a", "ipv4:127.0.0.1:1")
    assert [e.identity for e in store.audit.entries()] == ["silo-a"]
    store.close()


def test_an_unknown_kind_in_the_table_is_a_clear_error(tmp_path):
    store = Store(tmp_path)
    store._db.execute(
        "INSERT INTO audit_log (unix_s, kind, identity, peer, detail) VALUES (1, 'future', '', '', '')"
    )
    with pytest.raises(StoreError, match="kind 'future', unknown"):
        store.audit.entries()
    store.close()


def test_control_characters_are_escaped_so_an_entry_cannot_forge_lines(tmp_path):
    store = Store(tmp_path)
    store.audit.record(AuditKind.JOIN, "silo-a", "ipv4:1.2.3.4:5", "sdk 1\n2026 join silo-z\x1b[2J")
    (entry,) = store.audit.entries()
    store.close()
    assert entry.detail == "sdk 1\\n2026 join silo-z\\x1b[2J"


def test_refusals_are_audited_once_per_identity_and_reason_per_interval_with_a_count(tmp_path):
    # Arrange: a revoked key's holder retries in a loop; the clock is injected
    from fedpriv.coordinator.audit import DenialRecorder
    from fedpriv.transport import DenialReason

    store = Store(tmp_path)
    now = [0.0]
    record = DenialRecorder(store.audit, interval_s=60.0, clock=lambda: now[0])
    # Act
    for _ in range(500):
        record("silo-2", "ipv4:10.0.0.2:1", DenialReason.REVOKED)
    record("silo-3", "ipv4:10.0.0.3:1", DenialReason.REVOKED)
    record("silo-2", "ipv4:10.0.0.2:2", DenialReason.NOT_ALLOWED)
    now[0] = 61.0
    record("silo-2", "ipv4:10.0.0.2:3", DenialReason.REVOKED)
    # Assert: 503 refusals, 4 entries, and the 499 folded ones are counted
    entries = store.audit.entries(kinds=frozenset({AuditKind.DENIED}))
    assert [(e.identity, e.detail) for e in entries] == [
        ("silo-2", "revoked"),
        ("silo-3", "revoked"),
        ("silo-2", "not-on-allow-list"),
        ("silo-2", "revoked (499 more since the last entry)"),
    ]
    store.close()
