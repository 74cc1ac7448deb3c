"""Checks on TLS material that can never complete a handshake, made before any is tried."""

from __future__ import annotations

import datetime as dt
import pathlib

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from fedpriv.errors import ConfigError


def check_tls_material(
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
