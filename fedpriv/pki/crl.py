"""Certificate revocation lists: sign one with the CA key, load and watch one at the coordinator.

gRPC Python cannot check a CRL during the handshake (grpc/grpc#11841), so the
coordinator checks the serial of every caller's certificate against the list
it holds here. The list is trusted only if the federation CA signed it; it is
re-read when its file changes (checked with one ``stat`` when it is consulted)
or when :meth:`RevocationList.reload` is called (the daemon does on SIGHUP).
A file that turns unreadable, foreign or older than the one loaded is refused
with an error in the log, and the list loaded before stays in force: deleting
or corrupting the CRL never un-revokes a certificate.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import pathlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedpriv.errors import PKIError

__all__ = [
    "CRL_FILE",
    "DEFAULT_CRL_DAYS",
    "RevocationList",
    "RevokedEntry",
    "load_crl",
    "sign_crl",
]

logger = logging.getLogger(__name__)

CRL_FILE = "ca.crl"
# The coordinator keeps enforcing a CRL past its next_update (it logs a warning):
# a stale list still names every certificate revoked so far. A year keeps
# standard tools (openssl crl) from calling a fresh one stale.
DEFAULT_CRL_DAYS = 365
Listener = Callable[[frozenset[int]], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class RevokedEntry:
    """One serial on a CRL and when it was revoked."""

    serial: int
    revoked_at: dt.datetime


def sign_crl(
    *,
    issuer: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    revoked: Iterable[RevokedEntry],
    number: int,
    now: dt.datetime,
    days: int = DEFAULT_CRL_DAYS,
) -> bytes:
    """Build and sign a CRL (PEM) listing `revoked`.

    Args:
        issuer: The CA certificate.
        key: The CA's private key.
        revoked: Serials to list.
        number: The CRL number; each new list gets a larger one, so that a
            coordinator can refuse an older list put back in place.
        now: The list's last_update.
        days: Days until next_update.
    """
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    except x509.ExtensionNotFound:
        pass  # the identifier only helps tools pick the issuer; the signature is what counts
    for entry in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
            .build()
        )
    crl = builder.sign(key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0


def load_crl(
    data: bytes, *, issuer: x509.Certificate, source: str
) -> x509.CertificateRevocationList:
    """Parse `data` (PEM or DER) and check that `issuer` signed it.

    Raises:
        PKIError: It is no CRL, another CA issued it, or the signature does not verify.
    """
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            crl = x509.load_pem_x509_crl(data)
        else:
            crl = x509.load_der_x509_crl(data)
    except ValueError as err:
        raise PKIError(f"{source} is not a certificate revocation list: {err}") from None
    if crl.issuer != issuer.subject:
        raise PKIError(
            f"{source} was issued by {crl.issuer.rfc4514_string()!r}, not by the federation "
            f"CA {issuer.subject.rfc4514_string()!r}; sign it with `fedpriv pki crl`"
        )
    public_key = issuer.public_key()
    try:
        valid = crl.is_signature_valid(public_key)  # type: ignore[arg-type]
    except (TypeError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise PKIError(
            f"{source} is not signed by the federation CA's key (a tampered or foreign "
            "list); sign it with `fedpriv pki crl`"
        )
    return crl


def _signature(path: pathlib.Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


class RevocationList:
    """The revoked serials the coordinator enforces, reloaded when the file changes.

    Args:
        path: The CRL file.
        issuer: The federation CA certificate that must have signed it.
        required: A missing file is an error at start; else it means nothing is
            revoked yet (and the file is picked up once it appears).
        now: Clock, to warn about a list past its next_update.

    Raises:
        PKIError: The file exists (or is required) and cannot be trusted.
    """

    def __init__(
        self,
        path: pathlib.Path,
        *,
        issuer: x509.Certificate,
        required: bool = False,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.path = path
        self._issuer = issuer
        self._now = now
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._serials: frozenset[int] = frozenset()
        self._number = -1
        self._seen: tuple[int, int, int, int] | None = None
        self._signature_at_load = _signature(path)
        if self._signature_at_load is None:
            if required:
                raise PKIError(f"tls.crl = {str(path)!r}: no such file")
            return
        self._apply(self._read(path.read_bytes()))
        self._seen = self._signature_at_load

    @classmethod
    def from_files(
        cls, path: pathlib.Path, *, ca_cert: pathlib.Path, required: bool = False
    ) -> RevocationList:
        """Load the list at `path`, trusted only if the CA in `ca_cert` signed it.

        Raises:
            PKIError: The CA certificate or the list cannot be read or trusted.
        """
        try:
            issuer = x509.load_pem_x509_certificate(ca_cert.read_bytes())
        except (OSError, ValueError) as err:
            raise PKIError(f"cannot load the CA certificate {ca_cert}: {err}") from err
        return cls(path, issuer=issuer, required=required)

    @property
    def serials(self) -> frozenset[int]:
        """The revoked serials in force (without checking the file)."""
        return self._serials

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(newly_revoked_serials)` after each reload that adds serials."""
        self._listeners.append(listener)

    def is_revoked(self, serial: int) -> bool:
        """True if `serial` is revoked; re-reads the file first if it changed."""
        self.refresh()
        return serial in self._serials

    def refresh(self) -> frozenset[int]:
        """Reload if the file changed since it was last read; return the newly revoked serials."""
        current = _signature(self.path)
        if current == self._seen:
            return frozenset()
        return self._reload(current)

    def reload(self) -> frozenset[int]:
        """Re-read the file now (SIGHUP); return the newly revoked serials."""
        return self._reload(_signature(self.path))

    def _reload(self, current: tuple[int, int, int, int] | None) -> frozenset[int]:
        with self._lock:
            self._seen = current
            if current is None:
                if self._serials:
                    logger.error(
                        "revocation list %s is gone; the %d revocations loaded stay in force",
                        self.path,
                        len(self._serials),
                    )
                return frozenset()
            try:
                crl = self._read(self.path.read_bytes())
            except (OSError, PKIError) as err:
                logger.error(
                    "revocation list %s refused, the previous one stays in force: %s",
                    self.path,
                    err,
                )
                return frozenset()
            if _crl_number(crl) < self._number:
                logger.error(
                    "revocation list %s refused: CRL number %d is older than the %d loaded",
                    self.path,
                    _crl_number(crl),
                    self._number,
                )
                return frozenset()
            added = self._apply(crl)
        logger.info(
            "revocation list %s loaded: %d revoked, %d new",
            self.path,
            len(self._serials),
            len(added),
        )
        if added:
            for listener in list(self._listeners):
                listener(added)
        return added

    def _read(self, data: bytes) -> x509.CertificateRevocationList:
        crl = load_crl(data, issuer=self._issuer, source=str(self.path))
        next_update = crl.next_update_utc
        if next_update is not None and next_update < self._now():
            logger.warning(
                "revocation list %s is past its next_update (%s); it is still enforced: "
                "run `fedpriv pki crl` to renew it",
                self.path,
                next_update.isoformat(),
            )
        return crl

    def _apply(self, crl: x509.CertificateRevocationList) -> frozenset[int]:
        serials = frozenset(entry.serial_number for entry in crl)
        # A newer list never drops a serial from the enforced set in this process.
        added = serials - self._serials
        self._serials = self._serials | serials
        self._number = _crl_number(crl)
        return frozenset(added)
