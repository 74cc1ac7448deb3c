from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedpriv.errors import PKIError
from fedpriv.pki import CertificateAuthority, Role, identity_from_pem


def test_leaf_certificates_carry_the_extensions_tls_checks(tmp_path):
    ca = CertificateAuthority.create(tmp_path, federation="fed")
    server = x509.load_pem_x509_certificate(
        ca.issue(
            "coord", role=Role.SERVER, out_dir=tmp_path, hosts=["127.0.0.1", "coord.example"]
        ).cert_path.read_bytes()
    )
    client = x509.load_pem_x509_certificate(
        ca.issue("silo-1", role=Role.CLIENT, out_dir=tmp_path).cert_path.read_bytes()
    )
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).critical
    assert server.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage
    ).value == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coord.example"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    uris = client.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == ["fedpriv://fed/silo/silo-1"]
    assert client.not_valid_after_utc - client.not_valid_before_utc <= dt.timedelta(
        days=90, minutes=5
    )
    client.verify_directly_issued_by(ca.certificate)
    assert identity_from_pem(client.public_bytes(serialization.Encoding.PEM)) == "silo-1"


def test_keys_are_private_and_ca_is_not_overwritten(tmp_path):
    CertificateAuthority.create(tmp_path, federation="fed", passphrase=b"secret")
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(PKIError, match="refusing to overwrite"):
        CertificateAuthority.create(tmp_path, federation="fed")
    with pytest.raises(PKIError, match="cannot load"):
        CertificateAuthority.load(tmp_path, passphrase=b"wrong")
    ca = CertificateAuthority.load(tmp_path, passphrase=b"secret")
    issued = ca.issue("s", role=Role.CLIENT, out_dir=tmp_path / "out")
    assert issued.key_path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("name", ["", "-lead", "a b", "x" * 64, "../etc"])
def test_bad_names_are_refused(tmp_path, name):
    ca = CertificateAuthority.create(tmp_path, federation="fed")
    with pytest.raises(PKIError, match="not allowed"):
        ca.issue(name, role=Role.CLIENT, out_dir=tmp_path)


def test_server_certificate_needs_a_host(tmp_path):
    ca = CertificateAuthority.create(tmp_path, federation="fed")
    with pytest.raises(PKIError, match="at least one host"):
        ca.issue("coord", role=Role.SERVER, out_dir=tmp_path)
