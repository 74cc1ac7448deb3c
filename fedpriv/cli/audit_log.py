"""``fedpriv audit-log STATE_DIR``: the coordinator's audit entries, as a table or JSON lines."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence

from fedpriv.coordinator.audit import AuditEntry, AuditKind
from fedpriv.errors import ConfigError

__all__ = ["format_entries", "parse_kinds", "to_json_lines"]


def parse_kinds(names: Sequence[str] | None) -> frozenset[AuditKind] | None:
    """The kinds named on the command line (None: every kind).

    Raises:
        ConfigError: A name is not a kind.
    """
    if not names:
        return None
    known = {kind.value: kind for kind in AuditKind}
    unknown = sorted(set(names) - known.keys())
    if unknown:
        raise ConfigError(
            f"--kind {', '.join(unknown)}: not an audit kind; choose from {', '.join(known)}"
        )
    return frozenset(known[name] for name in names)


def _utc(unix_s: float) -> str:
    moment = datetime.datetime.fromtimestamp(unix_s, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_entries(entries: Sequence[AuditEntry]) -> str:
    """One line per entry: time (UTC), kind, identity, peer, detail."""
    if not entries:
        return "no audit entries"
    rows = [("time (UTC)", "kind", "identity", "peer", "detail")]
    rows += [
        (_utc(e.unix_s), e.kind.value, e.identity or "-", e.peer or "-", e.detail) for e in entries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True))
        + "  "
        + row[4]
        for row in rows
    )


def to_json_lines(entries: Sequence[AuditEntry]) -> str:
    """One JSON object per entry and line, for scripts."""
    return "\n".join(
        json.dumps(
            {
                "id": e.id,
                "time": _utc(e.unix_s),
                "unix_s": e.unix_s,
                "kind": e.kind.value,
                "identity": e.identity,
                "peer": e.peer,
                "detail": e.detail,
            }
        )
        for e in entries
    )
