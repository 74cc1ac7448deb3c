"""Writes the federation that ``fedpriv init DIR`` creates: CA, certificates, TOML files, app.

It writes a CA, a certificate per party, one TOML file per party and an
example silo app (:mod:`fedpriv.scaffold.app`), each party in its own folder,
as they would sit on separate machines. The CA's key stays in ``DIR/ca``.
"""

from __future__ import annotations

import pathlib
import shutil
from dataclasses import dataclass

from fedpriv.errors import ConfigError
from fedpriv.pki import CertificateAuthority, Role
from fedpriv.transport.options import DEFAULT_ADDRESS

__all__ = ["Scaffold", "scaffold"]

_APP = pathlib.Path(__file__).with_name("app.py")


@dataclass(frozen=True, slots=True)
class Scaffold:
    """What ``fedpriv init`` wrote and the commands that run it (from `root`)."""

    root: pathlib.Path
    commands: list[str]  # the coordinator's, then each silo's, each in its own terminal
    watch: str  # the operator's view while it runs
    state_dir: pathlib.Path  # the coordinator's rounds, checkpoints and round log
    report: str  # the plots once it has run


def _coordinator_toml(
    *, federation: str, address: str, silos: list[str], rounds: int, min_clients: int
) -> str:
    allowed = ", ".join(f'"{s}"' for s in silos)
    return f"""# Coordinator of the {federation!r} federation. Paths are relative to this file.
[federation]
name = "{federation}"
allowed_silos = [{allowed}]
operators = ["ops"]

[server]
address = "{address}"

[tls]
ca = "pki/ca.crt"
cert = "pki/coordinator.crt"
key = "pki/coordinator.key"
# `fedpriv pki revoke NAME --dir ca` re-signs this list; the coordinator follows it live.
crl = "../ca/ca.crl"

[rounds]
num_rounds = {rounds}
min_clients = {min_clients}
client_config = {{ epochs = 2 }}

[model]
factory = "app:make_model"   # app.py in the folder the coordinator runs from

[store]
dir = "state"
keep_checkpoints = 0         # 0 keeps every round's model; N keeps the newest N (and round 0)
"""


def _party_toml(*, name: str, address: str, app: str) -> str:
    return f"""# {name}: where the coordinator is and this party's certificate.
[coordinator]
address = "{address}"

[tls]
ca = "pki/ca.crt"
cert = "pki/{name}.crt"
key = "pki/{name}.key"
{app}"""


def scaffold(
    root: pathlib.Path,
    *,
    silos: int = 3,
    rounds: int = 5,
    address: str = DEFAULT_ADDRESS,
    federation: str | None = None,
) -> Scaffold:
    """Write a federation into `root` (which must be empty or absent).

    Raises:
        ConfigError: `root` holds files, or a setting is out of range.
    """
    if silos < 1:
        raise ConfigError(f"--silos {silos}: need at least 1")
    if rounds < 1:
        raise ConfigError(f"--rounds {rounds}: need at least 1")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r}: expected host:port, e.g. {DEFAULT_ADDRESS}")
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root} is not empty; fedpriv init writes into a new folder")
    name = federation or root.resolve().name
    names = [f"silo-{k}" for k in range(1, silos + 1)]
    ca = CertificateAuthority.create(root / "ca", federation=name)
    parties = {"coordinator": Role.SERVER, "ops": Role.CLIENT} | dict.fromkeys(names, Role.CLIENT)
    hosts = ["localhost", "127.0.0.1"]
    if host not in (*hosts, "0.0.0.0"):
        hosts.append(host)
    ca.write_crl()  # an empty, signed list for tls.crl to name
    for party, role in parties.items():
        pki = root / party / "pki"
        pki.mkdir(parents=True)
        ca.issue(party, role=role, out_dir=pki, hosts=hosts if role is Role.SERVER else ())
        shutil.copyfile(root / "ca" / "ca.crt", pki / "ca.crt")
    connect = f"{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    (root / "coordinator" / "coordinator.toml").write_text(
        _coordinator_toml(
            federation=name, address=address, silos=names, rounds=rounds, min_clients=silos
        )
    )
    for index, silo in enumerate(names):
        (root / silo / "silo.toml").write_text(
            _party_toml(name=silo, address=connect, app=f"\n[app]\nsilo_index = {index}\n")
        )
    (root / "ops" / "ops.toml").write_text(_party_toml(name="ops", address=connect, app=""))
    shutil.copyfile(_APP, root / "app.py")
    commands = [
        "fedpriv coordinator --config coordinator/coordinator.toml",
        *(f"fedpriv client --app app:make_client --config {s}/silo.toml" for s in names),
    ]
    return Scaffold(
        root=root,
        commands=commands,
        watch="fedpriv status --config ops/ops.toml",
        state_dir=root.resolve() / "coordinator" / "state",
        report="fedpriv report coordinator/state",
    )
