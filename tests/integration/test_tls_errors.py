"""TLS material that can never work: the silo exits at once, naming the cause and the fix.

Real processes (`fedpriv client`) against a real mTLS coordinator. No raw gRPC
C-core lines reach stderr, and nothing is retried.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

from fedpriv.pki import CertificateAuthority, Role
from tests.integration.test_processes import cli_pki
from tests.processes import processes

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORE_LINE = re.compile(r"^[IWEF]\d{4} |ssl_transport_security|tls_security_connector", re.M)


@pytest.fixture
def federation(tmp_path):
    cli_pki(tmp_path / "pki", ["silo-a", "silo-b"])
    other = tmp_path / "other"
    foreign = CertificateAuthority.create(other, federation="another")
    foreign.issue("silo-a", role=Role.CLIENT, out_dir=other)
    (tmp_path / "coordinator.toml").write_text("""
[server]
address = "127.0.0.1:0"
[tls]
ca = "pki/ca.crt"
cert = "pki/coordinator.crt"
key = "pki/coordinator.key"
[rounds]
num_rounds = 1
min_clients = 2
[model]
factory = "tests.apps:make_model"
[store]
dir = "state"
""")
    return tmp_path


def _silo(tmp_path, port: int, *, ca: str, cert: str, key: str) -> subprocess.CompletedProcess:
    config = tmp_path / "silo.toml"
    config.write_text(f"""
[coordinator]
address = "127.0.0.1:{port}"
[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[client]
# Far longer than the test allows: an error that cannot clear must not be retried.
reconnect_timeout_s = 3600
""")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "fedpriv",
            "client",
            "--app",
            "tests.apps:make_client",
            "--config",
            str(config),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "files, cause, fix",
    [
        (
            ("pki/ca.crt", "other/silo-a.crt", "other/silo-a.key"),
            "was not issued by the CA in tls.ca",
            "fedpriv pki issue",
        ),
        (
            ("pki/ca.crt", "pki/silo-a.crt", "pki/silo-b.key"),
            "is not the private key of tls.cert",
            "use the .key file",
        ),
        (
            ("other/ca.crt", "other/silo-a.crt", "other/silo-a.key"),
            "the TLS handshake with the coordinator failed",
            "tls.ca must be the federation's ca.crt",
        ),
    ],
    ids=["foreign-ca-certificate", "mismatched-key", "foreign-federation"],
)
def test_a_silo_with_unusable_tls_exits_naming_the_cause(federation, files, cause, fix):
    with processes(federation) as running:
        _, port = running.coordinator("coordinator", federation / "coordinator.toml")
        ca, cert, key = (str(federation / f) for f in files)
        done = _silo(federation, port, ca=ca, cert=cert, key=key)
    assert done.returncode == 2, done.stderr
    assert cause in done.stderr and fix in done.stderr, done.stderr
    assert not CORE_LINE.search(done.stderr), done.stderr
    assert "retrying" not in done.stderr
