"""A small certificate authority for one federation, built on ``cryptography``.

Keys are ECDSA P-256 (accepted by every gRPC TLS stack). Leaf certificates
carry the extensions TLS peers check: critical BasicConstraints, KeyUsage,
ExtendedKeyUsage (serverAuth or clientAuth) and a SubjectAlternativeName
(DNS/IP for the coordinator, a ``fedpriv://`` URI for silos).
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import logging
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpriv.errors import PKIError
from fedpriv.names import NAME_RULE, is_valid_name
from fedpriv.pki.crl import CRL_FILE, RevokedEntry, sign_crl
from fedpriv.pki.index import IssuedIndex, IssuedRecord, format_serial, parse_serial
from fedpriv.storage import write_atomic

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CertificateAuthority",
    "IssuedCertificate",
    "Role",
    "identity_from_pem",
]

logger = logging.getLogger(__name__)

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
DEFAULT_CA_DAYS = 3650
# Short-lived leaves limit the damage of a stolen key that nobody noticed; a noticed
# one is revoked (`fedpriv pki revoke`), which the coordinator enforces at once.
DEFAULT_LEAF_DAYS = 90


class Role(enum.Enum):
    """What a leaf certificate may be used for."""

    SERVER = "server"
    CLIENT = "client"


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuedCertificate:
    """Paths of a certificate and its private key."""

    cert_path: pathlib.Path
    key_path: pathlib.Path


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _check_name(name: str) -> None:
    if not is_valid_name(name):
        raise PKIError(f"name {name!r} is not allowed: use {NAME_RULE}")


def _key_bytes(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


class CertificateAuthority:
    """The federation's CA: creates itself, issues leaves, loads from disk.

    Example:
        >>> import tempfile
        >>> directory = pathlib.Path(tempfile.mkdtemp())
        >>> ca = CertificateAuthority.create(directory, federation="demo")
        >>> issued = ca.issue("hospital-a", role=Role.CLIENT, out_dir=directory)
        >>> identity_from_pem(issued.cert_path.read_bytes())
        'hospital-a'
        >>> [r.name for r in ca.revoke("hospital-a")]
        ['hospital-a']

    Args:
        certificate: The CA certificate.
        key: The CA's private key.
        directory: Where ``ca.crt`` lives; the index of issued certificates
            (``issued.json``) and the CRL (``ca.crl``) are kept there. None: no
            index is kept and nothing can be revoked.
        now: Clock (a parameter so that tests can issue certificates in the past).
    """

    def __init__(
        self,
        *,
        certificate: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        directory: pathlib.Path | None = None,
        now: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self.certificate = certificate
        self.directory = directory
        self._key = key
        self._now = now

    @property
    def federation(self) -> str:
        """The federation name (the CA's organisation)."""
        values = self.certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        return str(values[0].value) if values else "fedpriv"

    @classmethod
    def create(
        cls,
        directory: pathlib.Path,
        *,
        federation: str,
        days: int = DEFAULT_CA_DAYS,
        passphrase: bytes | None = None,
        now: Callable[[], dt.datetime] = _utcnow,
    ) -> CertificateAuthority:
        """Create a new CA in `directory` (``ca.crt`` and ``ca.key``, mode 0600).

        Raises:
            PKIError: A CA already exists there, or the name is invalid.
        """
        _check_name(federation)
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / CA_KEY_FILE).exists():
            raise PKIError(f"{directory / CA_KEY_FILE} exists; refusing to overwrite a CA")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, f"{federation} federation CA"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation),
            ]
        )
        start = now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - dt.timedelta(minutes=5))
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        write_atomic(directory / CA_KEY_FILE, _key_bytes(key, passphrase), mode=0o600)
        write_atomic(directory / CA_CERT_FILE, cert.public_bytes(serialization.Encoding.PEM))
        if not passphrase:
            logger.warning(
                "CA key %s is not encrypted; keep it offline or pass a passphrase",
                directory / CA_KEY_FILE,
            )
        return cls(certificate=cert, key=key, directory=directory, now=now)

    @classmethod
    def load(
        cls,
        directory: pathlib.Path,
        *,
        passphrase: bytes | None = None,
        now: Callable[[], dt.datetime] = _utcnow,
    ) -> CertificateAuthority:
        """Load the CA from `directory`.

        Raises:
            PKIError: Files are missing, unreadable or the passphrase is wrong.
        """
        try:
            cert = x509.load_pem_x509_certificate((directory / CA_CERT_FILE).read_bytes())
            key = serialization.load_pem_private_key(
                (directory / CA_KEY_FILE).read_bytes(), password=passphrase
            )
        except FileNotFoundError as err:
            raise PKIError(f"no CA in {directory}: run `fedpriv pki init` first ({err})") from err
        except (ValueError, TypeError) as err:
            raise PKIError(f"cannot load the CA key in {directory}: {err}") from err
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PKIError(f"{directory / CA_KEY_FILE} is not an EC key")
        return cls(certificate=cert, key=key, directory=directory, now=now)

    def issue(
        self,
        name: str,
        *,
        role: Role,
        out_dir: pathlib.Path,
        hosts: Sequence[str] = (),
        days: int = DEFAULT_LEAF_DAYS,
    ) -> IssuedCertificate:
        """Issue a leaf certificate and key for `name` into `out_dir`.

        Args:
            name: Identity (certificate CN): the silo name or the coordinator's name.
            role: SERVER for the coordinator, CLIENT for a silo.
            out_dir: Where ``NAME.crt`` and ``NAME.key`` are written.
            hosts: DNS names or IP addresses the server is reached at (SERVER only).
            days: Validity in days.

        Returns:
            The paths written.

        Raises:
            PKIError: The name is invalid, or a server has no host.
        """
        _check_name(name)
        if role is Role.SERVER and not hosts:
            raise PKIError("a server certificate needs at least one host (DNS name or IP)")
        key = ec.generate_private_key(ec.SECP256R1())
        start = self._now()
        alt_names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt_names.append(x509.DNSName(host))
        if role is Role.CLIENT:
            alt_names.append(
                x509.UniformResourceIdentifier(f"fedpriv://{self.federation}/silo/{name}")
            )
        usage = (
            ExtendedKeyUsageOID.SERVER_AUTH
            if role is Role.SERVER
            else (ExtendedKeyUsageOID.CLIENT_AUTH)
        )
        ca_ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.COMMON_NAME, name),
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.federation),
                    ]
                )
            )
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - dt.timedelta(minutes=5))
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        issued = IssuedCertificate(
            cert_path=out_dir / f"{name}.crt", key_path=out_dir / f"{name}.key"
        )
        write_atomic(issued.key_path, _key_bytes(key, None), mode=0o600)
        write_atomic(issued.cert_path, cert.public_bytes(serialization.Encoding.PEM))
        if self.directory is not None:
            index = IssuedIndex.load(self.directory)
            index.add(
                IssuedRecord(
                    name=name,
                    serial=cert.serial_number,
                    role=role.value,
                    not_before=cert.not_valid_before_utc,
                    not_after=cert.not_valid_after_utc,
                )
            )
            index.save()
        return issued

    @property
    def crl_path(self) -> pathlib.Path:
        """Where :meth:`revoke` and :meth:`write_crl` write the CRL (``ca.crl``)."""
        return self._directory() / CRL_FILE

    def _directory(self) -> pathlib.Path:
        if self.directory is None:
            raise PKIError("this CA has no directory: load it with CertificateAuthority.load")
        return self.directory

    def index(self) -> IssuedIndex:
        """The certificates this CA issued (``issued.json``).

        Raises:
            PKIError: The CA has no directory, or the index is malformed.
        """
        return IssuedIndex.load(self._directory())

    def revoke(self, name_or_serial: str) -> list[IssuedRecord]:
        """Revoke every unrevoked certificate of a name, or one serial (hex), and re-sign the CRL.

        A name is looked up first; otherwise the argument is read as a serial,
        which may be one the index never saw (it is then listed as nameless).

        Returns:
            The records revoked now.

        Raises:
            PKIError: Nothing matches, or everything that matches is revoked already.
        """
        index = self.index()
        matches = index.matching(name_or_serial)
        serials = [r.serial for r in matches if r.revoked_at is None]
        if not matches:
            serial = parse_serial(name_or_serial)
            if serial is None:
                raise PKIError(
                    f"no certificate named {name_or_serial!r} in {index.path}, and it is not a "
                    "serial (hex); see `fedpriv pki list`"
                )
            serials = [serial]
        if not serials:
            raise PKIError(
                f"{name_or_serial!r}: already revoked "
                f"({', '.join(format_serial(r.serial) for r in matches)})"
            )
        index.mark_revoked(serials, at=self._now().replace(microsecond=0))
        self.write_crl(index)
        revoked = [r for r in index.records if r.serial in set(serials)]
        for record in revoked:
            logger.warning(
                "revoked certificate name=%s serial=%s", record.name, format_serial(record.serial)
            )
        return revoked

    def write_crl(self, index: IssuedIndex | None = None) -> pathlib.Path:
        """Sign a fresh CRL of every revoked certificate (a new CRL number) and write it.

        Returns:
            The CRL's path.
        """
        index = index or self.index()
        index.crl_number += 1
        pem = sign_crl(
            issuer=self.certificate,
            key=self._key,
            revoked=[
                RevokedEntry(serial=r.serial, revoked_at=r.revoked_at)
                for r in index.revoked()
                if r.revoked_at is not None
            ],
            number=index.crl_number,
            now=self._now(),
        )
        # The index first: a crash between the two leaves a CRL that `pki crl` rewrites.
        index.save()
        write_atomic(self.crl_path, pem)
        return self.crl_path


def identity_from_pem(pem: bytes) -> str:
    """Return the identity (subject common name) of a PEM certificate.

    Raises:
        PKIError: The certificate has no common name.
    """
    cert = x509.load_pem_x509_certificate(pem)
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not values:
        raise PKIError("certificate has no common name")
    return str(values[0].value)
