"""``fedpriv pki``: create the CA, issue, list and revoke certificates, re-sign the CRL."""

from __future__ import annotations

import argparse
import datetime as dt
import pathlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from fedpriv.errors import ConfigError

if TYPE_CHECKING:
    from fedpriv.pki import CertificateAuthority, IssuedRecord

__all__ = ["add_pki_commands", "format_certificates"]


def _passphrase(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return pathlib.Path(path).read_bytes().strip() or None
    except OSError as err:
        raise ConfigError(f"cannot read passphrase file {path}: {err.strerror}") from err


def _load(args: argparse.Namespace) -> CertificateAuthority:
    from fedpriv.pki import CertificateAuthority

    return CertificateAuthority.load(
        pathlib.Path(args.dir), passphrase=_passphrase(args.passphrase_file)
    )


def _cmd_init(args: argparse.Namespace) -> int:
    from fedpriv.pki import CertificateAuthority

    ca = CertificateAuthority.create(
        pathlib.Path(args.dir),
        federation=args.federation,
        passphrase=_passphrase(args.passphrase_file),
    )
    print(f"created CA for federation {ca.federation!r} in {args.dir}")
    return 0


def _cmd_issue(args: argparse.Namespace) -> int:
    from fedpriv.pki import Role

    role = Role.SERVER if args.server else Role.CLIENT
    issued = _load(args).issue(
        args.name,
        role=role,
        out_dir=pathlib.Path(args.out or args.dir),
        hosts=args.host or [],
        days=args.days,
    )
    print(f"issued {role.value} certificate {issued.cert_path} (key {issued.key_path})")
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    ca = _load(args)
    for record in ca.revoke(args.name_or_serial):
        print(f"revoked {record.name or '(unknown name)'} serial {record.serial:X}")
    print(
        f"wrote {ca.crl_path}; a coordinator enforcing it refuses these certificates "
        "within a second, without a restart"
    )
    return 0


def _cmd_crl(args: argparse.Namespace) -> int:
    ca = _load(args)
    path = ca.write_crl()
    print(f"wrote {path} ({len(ca.index().revoked())} revoked)")
    return 0


def format_certificates(records: Iterable[IssuedRecord], *, now: dt.datetime) -> str:
    """A table of issued certificates: name, role, serial, state, expiry, revocation time."""
    header = ("NAME", "ROLE", "SERIAL", "STATE", "NOT AFTER", "REVOKED AT")
    rows = [header]
    for record in records:
        rows.append(
            (
                record.name or "-",
                record.role,
                f"{record.serial:X}",
                record.state(now).value,
                record.not_after.strftime("%Y-%m-%d %H:%M"),
                "-" if record.revoked_at is None else record.revoked_at.strftime("%Y-%m-%d %H:%M"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _cmd_list(args: argparse.Namespace) -> int:
    from fedpriv.pki import IssuedIndex

    index = IssuedIndex.load(pathlib.Path(args.dir))
    if not index.records:
        print(f"no certificates recorded in {index.path}")
        return 0
    print(format_certificates(index.records, now=dt.datetime.now(dt.UTC)))
    return 0


def add_pki_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``fedpriv pki`` and its subcommands to the top-level parser."""
    pki = commands.add_parser("pki", help="certificate authority and certificates")
    sub = pki.add_subparsers(dest="pki_command", required=True)
    init = sub.add_parser("init", help="create a federation CA")
    init.add_argument("--dir", required=True, help="folder for ca.crt and ca.key")
    init.add_argument("--federation", default="fedpriv", help="federation name")
    init.add_argument("--passphrase-file", help="encrypt ca.key with this file's contents")
    init.set_defaults(run=_cmd_init)

    issue = sub.add_parser("issue", help="issue a server or silo certificate")
    issue.add_argument("name", help="identity: the silo name or the coordinator's name")
    role = issue.add_mutually_exclusive_group(required=True)
    role.add_argument("--server", action="store_true", help="coordinator certificate")
    role.add_argument("--client", action="store_true", help="silo certificate")
    issue.add_argument("--dir", required=True, help="folder holding the CA")
    issue.add_argument("--out", help="folder for NAME.crt and NAME.key (default: --dir)")
    issue.add_argument("--host", action="append", help="server DNS name or IP (repeatable)")
    issue.add_argument("--days", type=int, default=90, help="validity in days")
    issue.add_argument("--passphrase-file", help="passphrase of ca.key")
    issue.set_defaults(run=_cmd_issue)

    revoke = sub.add_parser(
        "revoke", help="revoke a name's certificates or one serial; re-signs DIR/ca.crl"
    )
    revoke.add_argument("name_or_serial", help="a silo name, or a serial in hex (pki list)")
    revoke.add_argument("--dir", required=True, help="folder holding the CA")
    revoke.add_argument("--passphrase-file", help="passphrase of ca.key")
    revoke.set_defaults(run=_cmd_revoke)

    crl = sub.add_parser("crl", help="re-sign DIR/ca.crl (renew it, or write an empty one)")
    crl.add_argument("--dir", required=True, help="folder holding the CA")
    crl.add_argument("--passphrase-file", help="passphrase of ca.key")
    crl.set_defaults(run=_cmd_crl)

    listing = sub.add_parser("list", help="issued certificates: valid, expired and revoked")
    listing.add_argument("--dir", required=True, help="folder holding the CA")
    listing.set_defaults(run=_cmd_list)
