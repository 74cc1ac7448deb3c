"""The coordinator's SQLite schema: every table, created if missing when a store opens.

A state folder written by an older version gets the tables it lacks, empty.
The tables of one job are defined beside their code (audit, round privacy,
release ledger, strategy state) and joined here.
"""

from __future__ import annotations

from fedpriv.coordinator.audit import AUDIT_SCHEMA
from fedpriv.coordinator.privacy_record import ROUND_PRIVACY_SCHEMA
from fedpriv.coordinator.release_ledger import RELEASES_SCHEMA
from fedpriv.coordinator.strategy_state import STRATEGY_STATE_SCHEMA

__all__ = ["SCHEMA"]

# Rounds, attempts, participants, metrics and silos: the store's own tables.
_CORE = """
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    started_unix_s REAL NOT NULL,
    finished_unix_s REAL NOT NULL,
    selected INTEGER NOT NULL,
    accepted INTEGER NOT NULL,
    total_weight REAL NOT NULL,
    checkpoint TEXT NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    started_unix_s REAL NOT NULL,
    finished_unix_s REAL NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS participants (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    task TEXT NOT NULL,
    silo TEXT NOT NULL,
    outcome TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    bytes_received INTEGER NOT NULL,
    detail TEXT NOT NULL,
    unix_s REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    round INTEGER NOT NULL,
    source TEXT NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (round, source, name)
);
CREATE TABLE IF NOT EXISTS silos (
    silo TEXT PRIMARY KEY,
    first_seen_unix_s REAL NOT NULL,
    last_seen_unix_s REAL NOT NULL
);
"""

SCHEMA = _CORE + ROUND_PRIVACY_SCHEMA + RELEASES_SCHEMA + AUDIT_SCHEMA + STRATEGY_STATE_SCHEMA
