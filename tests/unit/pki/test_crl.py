"""Revocation: the index of issued certificates, signed CRLs and the list the coordinator holds."""

from __future__ import annotations

import datetime as dt
import json
import logging

import pytest
from cryptography import x509

from fedpriv.errors import PKIError
from fedpriv.pki import CertificateAuthority, CertificateState, RevocationList, Role, sign_crl
from fedpriv.pki.crl import RevokedEntry


def _serial(path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


@pytest.fixture
def ca(tmp_path):
    ca = CertificateAuthority.create(tmp_path / "ca", federation="fed")
    for name in ("silo-1", "silo-2", "silo-3"):
        ca.issue(name, role=Role.CLIENT, out_dir=tmp_path / "ca")
    return ca


def test_issue_records_name_serial_and_validity_in_the_index(ca, tmp_path):
    records = ca.index().records
    assert [r.name for r in records] == ["silo-1", "silo-2", "silo-3"]
    assert records[1].serial == _serial(tmp_path / "ca" / "silo-2.crt")
    assert all(r.revoked_at is None and r.role == "client" for r in records)
    document = json.loads((tmp_path / "ca" / "issued.json").read_text())
    assert document["certificates"][1]["serial"] == f"{records[1].serial:X}"


def test_revoke_by_name_writes_a_crl_the_ca_signed_that_lists_the_serial(ca, tmp_path):
    revoked = ca.revoke("silo-2")
    serial = _serial(tmp_path / "ca" / "silo-2.crt")
    assert [r.serial for r in revoked] == [serial]
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(ca.certificate.public_key())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert len(list(crl)) == 1
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1


def test_revoke_by_serial_and_again_is_refused(ca, tmp_path):
    serial = _serial(tmp_path / "ca" / "silo-3.crt")
    assert [r.name for r in ca.revoke(f"{serial:x}")] == ["silo-3"]
    with pytest.raises(PKIError, match="already revoked"):
        ca.revoke("silo-3")
    with pytest.raises(PKIError, match="no certificate named 'nobody'"):
        ca.revoke("nobody")


def test_a_serial_the_index_never_saw_still_reaches_the_crl(ca):
    ca.revoke("0xABCDEF")
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(0xABCDEF) is not None


def test_list_states_issued_expired_and_revoked(tmp_path):
    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    past = CertificateAuthority.create(tmp_path, federation="fed", now=lambda: start)
    past.issue("old", role=Role.CLIENT, out_dir=tmp_path, days=1)
    ca = CertificateAuthority.load(tmp_path)
    ca.issue("new", role=Role.CLIENT, out_dir=tmp_path)
    ca.issue("gone", role=Role.CLIENT, out_dir=tmp_path)
    ca.revoke("gone")
    now = dt.datetime.now(dt.UTC)
    assert {r.name: r.state(now) for r in ca.index().records} == {
        "old": CertificateState.EXPIRED,
        "new": CertificateState.VALID,
        "gone": CertificateState.REVOKED,
    }


def test_revocation_list_loads_the_ca_signed_crl_and_looks_up_serials(ca, tmp_path):
    ca.revoke("silo-1")
    revocations = RevocationList(ca.crl_path, issuer=ca.certificate)
    assert revocations.is_revoked(_serial(tmp_path / "ca" / "silo-1.crt"))
    assert not revocations.is_revoked(_serial(tmp_path / "ca" / "silo-2.crt"))


def test_a_crl_signed_by_another_ca_is_refused(ca, tmp_path):
    foreign = CertificateAuthority.create(tmp_path / "other", federation="fed")
    foreign.revoke("0x1")
    with pytest.raises(PKIError, match="not signed by the federation CA"):
        RevocationList(foreign.crl_path, issuer=ca.certificate)
    other_name = CertificateAuthority.create(tmp_path / "third", federation="else")
    other_name.revoke("0x1")
    with pytest.raises(PKIError, match="not by the federation CA"):
        RevocationList(other_name.crl_path, issuer=ca.certificate)


def test_a_file_that_is_no_crl_is_refused_and_a_required_missing_one_too(ca, tmp_path):
    junk = tmp_path / "junk.crl"
    junk.write_bytes(b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    with pytest.raises(PKIError, match="not a certificate revocation list"):
        RevocationList(junk, issuer=ca.certificate)
    with pytest.raises(PKIError, match="no such file"):
        RevocationList(tmp_path / "missing.crl", issuer=ca.certificate, required=True)
    assert RevocationList(tmp_path / "missing.crl", issuer=ca.certificate).serials == frozenset()


def test_the_list_reloads_when_the_file_changes_and_tells_its_listeners(ca, tmp_path):
    revocations = RevocationList(ca.crl_path, issuer=ca.certificate)  # no file yet
    heard: list[frozenset[int]] = []
    revocations.subscribe(heard.append)
    serial = _serial(tmp_path / "ca" / "silo-2.crt")
    assert not revocations.is_revoked(serial)
    ca.revoke("silo-2")
    assert revocations.is_revoked(serial)  # one stat noticed the new file
    assert heard == [frozenset({serial})]
    assert revocations.refresh() == frozenset()  # unchanged: nothing re-read
    ca.revoke("silo-3")
    assert revocations.reload() == frozenset({_serial(tmp_path / "ca" / "silo-3.crt")})


def test_a_tampered_or_older_crl_keeps_the_loaded_one_in_force(ca, tmp_path, caplog):
    ca.revoke("silo-1")
    first = ca.crl_path.read_bytes()
    ca.revoke("silo-2")
    revocations = RevocationList(ca.crl_path, issuer=ca.certificate)
    enforced = revocations.serials
    assert len(enforced) == 2
    with caplog.at_level(logging.ERROR, logger="fedpriv.pki.crl"):
        ca.crl_path.write_bytes(first)  # an older list put back: CRL number 1 < 2
        assert revocations.reload() == frozenset()
        forged = sign_crl(
            issuer=ca.certificate,
            key=CertificateAuthority.create(tmp_path / "x", federation="fed")._key,
            revoked=[],
            number=9,
            now=dt.datetime.now(dt.UTC),
        )
        ca.crl_path.write_bytes(forged)
        assert revocations.reload() == frozenset()
        ca.crl_path.unlink()
        assert revocations.reload() == frozenset()
    assert revocations.serials == enforced
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "older than" in messages and "not signed by the federation CA" in messages
    assert "stay in force" in messages


def test_renewing_the_crl_keeps_every_revocation_with_a_larger_number(ca):
    ca.revoke("silo-1")
    ca.write_crl()
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert len(list(crl)) == 1
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    assert [
        RevokedEntry(serial=e.serial_number, revoked_at=e.revocation_date_utc) for e in crl
    ] == [RevokedEntry(serial=r.serial, revoked_at=r.revoked_at) for r in ca.index().revoked()]
