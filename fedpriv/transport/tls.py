"""TLS material as one object, and the gRPC credentials built from it."""

from __future__ import annotations

import logging
import pathlib
from dataclasses import dataclass

import grpc

from fedpriv.errors import ConfigError
from fedpriv.pki.material import check_tls_material

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
        check_tls_material(values, ca=ca, cert=cert, key=key)
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
