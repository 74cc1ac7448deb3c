"""Certificates for a federation: create a CA, issue server and silo certificates."""

from __future__ import annotations

from fedpriv.pki.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CertificateAuthority,
    IssuedCertificate,
    Role,
    identity_from_pem,
)

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CertificateAuthority",
    "IssuedCertificate",
    "Role",
    "identity_from_pem",
]
