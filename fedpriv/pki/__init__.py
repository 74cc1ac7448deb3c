"""Certificates for a federation: create a CA, issue, list and revoke certificates."""

from __future__ import annotations

from fedpriv.pki.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CertificateAuthority,
    IssuedCertificate,
    Role,
    identity_from_pem,
)
from fedpriv.pki.crl import CRL_FILE, RevocationList, sign_crl
from fedpriv.pki.index import CertificateState, IssuedIndex, IssuedRecord

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CRL_FILE",
    "CertificateAuthority",
    "CertificateState",
    "IssuedCertificate",
    "IssuedIndex",
    "IssuedRecord",
    "RevocationList",
    "Role",
    "identity_from_pem",
    "sign_crl",
]
