"""The CA's record of the certificates it issued (``issued.json`` beside ``ca.crt``).

The index is what ``fedpriv pki list`` prints and what ``fedpriv pki revoke``
resolves a name to. It holds no secret: names, serials, validity and the time
each certificate was revoked. The certificate revocation list (``ca.crl``) is
signed from it, so the CRL, not this file, is what the coordinator trusts.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import pathlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fedpriv.errors import PKIError
from fedpriv.storage import write_atomic

__all__ = [
    "INDEX_FILE",
    "CertificateState",
    "IssuedIndex",
    "IssuedRecord",
    "format_serial",
    "parse_serial",
]

INDEX_FILE = "issued.json"
_VERSION = 1
_HEX = re.compile(r"^(0x)?[0-9a-f]+$")


class CertificateState(enum.Enum):
    """Where a certificate stands at a given time."""

    VALID = "valid"
    EXPIRED = "expired"
    REVOKED = "revoked"


def format_serial(serial: int) -> str:
    """Upper-case hex, as ``openssl x509 -serial`` prints it."""
    return f"{serial:X}"


def parse_serial(text: str) -> int | None:
    """Parse a hex serial (``0x`` prefix and ``:`` separators allowed); None if it is not one."""
    cleaned = text.strip().lower().replace(":", "")
    if not cleaned or not _HEX.match(cleaned):
        return None
    return int(cleaned.removeprefix("0x"), 16)


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuedRecord:
    """One issued certificate.

    Args:
        name: The identity (certificate CN); empty for a serial revoked that the
            index never saw issued.
        serial: The certificate's serial number.
        role: ``server`` or ``client``.
        not_before: Start of validity (UTC).
        not_after: End of validity (UTC).
        revoked_at: When it was revoked; None while it is not.
    """

    name: str
    serial: int
    role: str
    not_before: dt.datetime
    not_after: dt.datetime
    revoked_at: dt.datetime | None = None

    def state(self, now: dt.datetime) -> CertificateState:
        """Revoked wins over expired: a revoked certificate stays on the CRL."""
        if self.revoked_at is not None:
            return CertificateState.REVOKED
        return CertificateState.EXPIRED if now >= self.not_after else CertificateState.VALID

    def to_json(self) -> dict[str, Any]:
        """The record as JSON values (serial in hex, times in ISO 8601)."""
        return {
            "name": self.name,
            "serial": format_serial(self.serial),
            "role": self.role,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "revoked_at": None if self.revoked_at is None else self.revoked_at.isoformat(),
        }

    @classmethod
    def from_json(cls, data: Any) -> IssuedRecord:
        """Parse one record.

        Raises:
            PKIError: A field is missing or malformed.
        """
        try:
            serial = parse_serial(str(data["serial"]))
            if serial is None:
                raise ValueError(f"serial {data['serial']!r} is not hex")
            revoked = data.get("revoked_at")
            return cls(
                name=str(data["name"]),
                serial=serial,
                role=str(data["role"]),
                not_before=_utc(data["not_before"]),
                not_after=_utc(data["not_after"]),
                revoked_at=None if revoked is None else _utc(revoked),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise PKIError(f"malformed record in {INDEX_FILE}: {err}") from err


def _utc(value: Any) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


class IssuedIndex:
    """The records of one CA directory, read and written as a whole.

    Example:
        >>> import tempfile
        >>> index = IssuedIndex.load(pathlib.Path(tempfile.mkdtemp()))
        >>> index.records
        ()
    """

    def __init__(
        self, path: pathlib.Path, records: Sequence[IssuedRecord], *, crl_number: int = 0
    ) -> None:
        self.path = path
        self.records = tuple(records)
        self.crl_number = crl_number

    @classmethod
    def load(cls, directory: pathlib.Path) -> IssuedIndex:
        """Read ``issued.json`` in `directory`; a missing file is an empty index.

        Raises:
            PKIError: The file is unreadable or malformed.
        """
        path = directory / INDEX_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls(path, ())
        except OSError as err:
            raise PKIError(f"cannot read {path}: {err.strerror}") from err
        try:
            data = json.loads(raw)
        except ValueError as err:
            raise PKIError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(data, dict) or data.get("version") != _VERSION:
            raise PKIError(f"{path}: expected a version {_VERSION} index")
        records = data.get("certificates")
        if not isinstance(records, list):
            raise PKIError(f"{path}: 'certificates' must be a list")
        crl_number = data.get("crl_number", 0)
        if not isinstance(crl_number, int) or crl_number < 0:
            raise PKIError(f"{path}: 'crl_number' must be a non-negative integer")
        return cls(path, [IssuedRecord.from_json(r) for r in records], crl_number=crl_number)

    def save(self) -> None:
        """Write the index atomically."""
        document = {
            "version": _VERSION,
            "crl_number": self.crl_number,
            "certificates": [r.to_json() for r in self.records],
        }
        write_atomic(self.path, (json.dumps(document, indent=2) + "\n").encode())

    def add(self, record: IssuedRecord) -> None:
        """Append a newly issued certificate."""
        self.records = (*self.records, record)

    def matching(self, name_or_serial: str) -> list[IssuedRecord]:
        """Records whose name is `name_or_serial`, else whose serial it is (hex)."""
        by_name = [r for r in self.records if r.name and r.name == name_or_serial]
        if by_name:
            return by_name
        serial = parse_serial(name_or_serial)
        return [r for r in self.records if serial is not None and r.serial == serial]

    def mark_revoked(self, serials: Iterable[int], *, at: dt.datetime) -> None:
        """Set `revoked_at` on the records of `serials` not revoked yet.

        A serial the index has no record of gets one with no name, so that it
        still reaches the CRL (a certificate issued before the index existed).
        """
        wanted = set(serials)
        updated: list[IssuedRecord] = []
        for record in self.records:
            if record.serial in wanted:
                wanted.discard(record.serial)
                if record.revoked_at is None:
                    record = replace(record, revoked_at=at)
            updated.append(record)
        for serial in sorted(wanted):
            updated.append(
                IssuedRecord(
                    name="",
                    serial=serial,
                    role="unknown",
                    not_before=at,
                    not_after=at,
                    revoked_at=at,
                )
            )
        self.records = tuple(updated)

    def revoked(self) -> list[IssuedRecord]:
        """Every revoked record, oldest revocation first."""
        found = [r for r in self.records if r.revoked_at is not None]
        return sorted(found, key=lambda r: (r.revoked_at, r.serial))
