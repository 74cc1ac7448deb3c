"""TLS material as one object, and the gRPC credentials built from it."""

from __future__ import annotations

import datetime as dt
import logging
import pathlib
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from fedpriv.errors import ConfigError

__all__ = ["TLSConfig"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSConfig:
    """The federation CA plus this party's certificate chain and private key.

    Build it with :meth:`from_files`; the key bytes never appear in its repr.
    """

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:
        return "TLSConfig(ca_pem=..., cert_pem=..., key_pem=<hidden>)"

    @classmethod
    def from_files(
        cls, *, ca: str | pathlib.Path, cert: str | pathlib.Path, key: str | pathlib.Path
    ) -> TLSConfig:
        """Read PEM files.

        Raises:
            ConfigError: A file is missing or is not PEM, the key is not the
                certificate's, the certificate was not issued by the CA in `ca`, or it
                has expired. Each of these would fail every TLS handshake; found here,
                the error names the file and the fix instead of a retried connection.
        """
        values: dict[str, bytes] = {}
        for field, path, marker in (
            ("ca", ca, b"-----BEGIN CERTIFICATE-----"),
            ("cert", cert, b"-----BEGIN CERTIFICATE-----"),
            ("key", key, b"PRIVATE KEY-----"),
        ):
            try:
                data = pathlib.Path(path).read_bytes()
            except OSError as err:
                raise ConfigError(f"tls.{field}: cannot read {path}: {err.strerror}") from err
            if marker not in data:
                raise ConfigError(f"tls.{field}: {path} is not a PEM {marker.decode().strip('-')}")
            values[field] = data
        _check_pair(values, ca=ca, cert=cert, key=key)
        return cls(ca_pem=values["ca"], cert_pem=values["cert"], key_pem=values["key"])

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials that require a client certificate signed by the federation CA."""
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)],
            root_certificates=self.ca_pem,
            # Off by default in gRPC; fedpriv's identity model depends on it.
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials that trust only the federation CA (no system roots)."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.key_pem,
            certificate_chain=self.cert_pem,
        )


def _check_pair(
    pems: dict[str, bytes],
    *,
    ca: str | pathlib.Path,
    cert: str | pathlib.Path,
    key: str | pathlib.Path,
) -> None:
    """Refuse TLS material that can never complete a handshake, naming the files.

    Raises:
        ConfigError: Unreadable PEM, a key that is not the certificate's, a
            certificate that no CA in `ca` issued, or one outside its validity.
    """
    try:
        leaf = x509.load_pem_x509_certificates(pems["cert"])[0]
        authorities = x509.load_pem_x509_certificates(pems["ca"])
        private = serialization.load_pem_private_key(pems["key"], password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"tls: cannot read {cert}, {key} or {ca}: {err}") from err
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if private.public_key().public_bytes(encoding, public) != leaf.public_key().public_bytes(
        encoding, public
    ):
        raise ConfigError(
            f"tls.key {key} is not the private key of tls.cert {cert}: use the .key file "
            "that `fedpriv pki issue` wrote beside that certificate"
        )
    issued = False
    for authority in authorities:
        try:
            leaf.verify_directly_issued_by(authority)
        except (ValueError, TypeError, InvalidSignature):
            continue
        issued = True
        break
    if not issued:
        raise ConfigError(
            f"tls.cert {cert} ({leaf.subject.rfc4514_string()}) was not issued by the CA in "
            f"tls.ca {ca} ({', '.join(a.subject.rfc4514_string() for a in authorities)}): "
            "the other side refuses it. Use a certificate from this federation's CA "
            "(`fedpriv pki issue NAME --client --dir PKI_DIR`) and that CA's ca.crt"
        )
    now = dt.datetime.now(dt.UTC)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise ConfigError(
            f"tls.cert {cert} is valid from {leaf.not_valid_before_utc:%Y-%m-%d} to "
            f"{leaf.not_valid_after_utc:%Y-%m-%d}, not now: issue a new one "
            "(`fedpriv pki issue NAME`)"
        )
