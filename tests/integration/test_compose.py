"""docker-compose.yml without Docker: `docker-compose config`, then a rehearsal of its services.

The rehearsal reads each service's command, environment, working directory,
volumes, dependencies and healthcheck from the compose file and runs the command
as a process the way a container would see the world:
- its own network namespace, with a veth pair into one bridge, and the service
  names in its /etc/hosts (``ip netns exec`` mounts /etc/netns/NAME/hosts);
- its own mount namespace, with a tmpfs on /srv, the working tree at
  /srv/fedpriv (the image's COPY) and each named volume bind-mounted at its path.
Services start in dependency order: ``service_completed_successfully`` waits for
the exit, ``service_healthy`` runs the healthcheck command until it passes.
It needs root (namespaces, mounts); elsewhere it skips and says why, and under
CI=true it fails instead (tests.helpers.require_privilege).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import yaml

from tests.helpers import require_privilege
from tests.processes import LISTENING, Watched

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
IMAGE_ROOT = "/srv/fedpriv"  # where the Dockerfile copies the working tree


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_passes_docker_compose_config():
    binary = shutil.which("docker-compose")
    require_privilege(
        "docker-compose is not installed (CI installs Debian's docker-compose)"
        if binary is None
        else None
    )
    assert binary is not None
    result = subprocess.run(
        [binary, "-f", str(COMPOSE), "config", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_compose_services_have_mtls_dp_and_secure_aggregation():
    services = load_compose()["services"]
    assert set(services) == {"pki", "coordinator", "silo-1", "silo-2", "silo-3"}
    coordinator = (ROOT / "examples/compose/coordinator.toml").read_text()
    assert "secure_aggregation = true" in coordinator and "[dp]" in coordinator
    for name in ("silo-1", "silo-2", "silo-3"):
        volumes = services[name]["volumes"]
        # Each silo mounts only its own certificate volume and its own data volume.
        assert volumes == [f"{name}-pki:/srv/pki:ro", f"{name}-data:/srv/data"]
        assert "--insecure" not in services[name]["command"]
        assert services[name]["depends_on"] == {"coordinator": {"condition": "service_healthy"}}
    assert "--insecure" not in services["coordinator"]["command"]


def _missing_privilege() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root for ip netns, veth, bridges and mounts (CI runs as root)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not pathlib.Path("/srv").is_dir():
        return "/srv does not exist to mount the services' tmpfs on"
    probe = f"fpprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add is not permitted here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


class Network:
    """A bridge and, per service, a namespace with a veth into it and a hosts file."""

    def __init__(self, services: list[str]) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.bridge = f"fpbr{self.tag}"
        subnet = 100 + os.getpid() % 100
        self.addresses = {s: f"10.{subnet}.77.{k + 2}" for k, s in enumerate(services)}
        self.namespaces = {s: f"fp{self.tag}{k}" for k, s in enumerate(services)}
        self._made: list[tuple[str, ...]] = []

    def __enter__(self) -> Network:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._made.append(("ip", "link", "del", self.bridge))
        _run("ip", "link", "set", self.bridge, "up")
        hosts = "127.0.0.1 localhost\n" + "".join(
            f"{address} {service}\n" for service, address in self.addresses.items()
        )
        for k, (service, namespace) in enumerate(self.namespaces.items()):
            _run("ip", "netns", "add", namespace)
            self._made.append(("ip", "netns", "del", namespace))
            etc = pathlib.Path("/etc/netns") / namespace
            etc.mkdir(parents=True)
            self._made.append(("rm", "-rf", str(etc)))
            (etc / "hosts").write_text(hosts)
            outside, inside = f"fp{self.tag}h{k}", f"fp{self.tag}c{k}"
            _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            self._made.append(("ip", "link", "del", outside))
            _run("ip", "link", "set", outside, "master", self.bridge, "up")
            _run("ip", "link", "set", inside, "netns", namespace)
            inside_ns = ("ip", "netns", "exec", namespace)
            _run(*inside_ns, "ip", "addr", "add", f"{self.addresses[service]}/24", "dev", inside)
            _run(*inside_ns, "ip", "link", "set", inside, "up")
            _run(*inside_ns, "ip", "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc: object) -> None:
        for command in reversed(self._made):
            subprocess.run(command, capture_output=True)


def _container(
    network: Network,
    volumes_dir: pathlib.Path,
    service: str,
    spec: dict[str, Any],
    command: list[str],
) -> list[str]:
    """`command` as the service's container would run it, namespaces and mounts included."""
    steps = ["mount -t tmpfs tmpfs /srv", f"mkdir -p {IMAGE_ROOT}"]
    steps.append(f"mount --bind {shlex.quote(str(ROOT))} {IMAGE_ROOT}")
    for volume in spec.get("volumes", []):
        name, target, *mode = volume.split(":")
        source = volumes_dir / name
        source.mkdir(exist_ok=True)
        steps += [f"mkdir -p {target}", f"mount --bind {shlex.quote(str(source))} {target}"]
        if mode == ["ro"]:
            steps.append(f"mount -o remount,bind,ro {target}")
    steps.append(f"cd {spec.get('working_dir', '/')}")
    steps.append('exec "$@"')
    return [
        "ip", "netns", "exec", network.namespaces[service],
        "unshare", "--mount", "--propagation", "private",
        "sh", "-c", " && ".join(steps), service, *command,
    ]  # fmt: skip


def _environment(spec: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The image's PATH has the fedpriv command; here it is in this interpreter's folder.
    env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update({k: str(v) for k, v in (spec.get("environment") or {}).items()})
    return env


def _start_order(services: dict[str, Any]) -> list[str]:
    order: list[str] = []
    while len(order) < len(services):
        ready = [
            s
            for s, spec in services.items()
            if s not in order and set(spec.get("depends_on") or {}) <= set(order)
        ]
        assert ready, "depends_on has a cycle"
        order += sorted(ready)
    return order


@contextlib.contextmanager
def _processes() -> Iterator[dict[str, Watched]]:
    running: dict[str, Watched] = {}
    try:
        yield running
    finally:
        for process in running.values():
            process.kill()


def test_compose_federation_completes_its_rounds_across_network_namespaces(tmp_path):
    require_privilege(_missing_privilege())
    # Arrange
    compose = load_compose()
    services: dict[str, Any] = compose["services"]
    order = _start_order(services)
    assert order[0] == "pki" and order[1] == "coordinator"
    volumes_dir = tmp_path / "volumes"
    volumes_dir.mkdir()
    assert {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])} <= set(
        compose["volumes"]
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    with Network(order) as network, _processes() as running:
        addresses = network.addresses
        # Act: start every service once its dependencies hold
        for service in order:
            spec = services[service]
            for dependency, condition in (spec.get("depends_on") or {}).items():
                _wait_for(condition["condition"], dependency, services, running, network,
                          volumes_dir, logs)  # fmt: skip
            running[service] = Watched(
                _container(network, volumes_dir, service, spec, spec["command"]),
                logs / f"{service}.log",
                env=_environment(spec),
                out=logs / f"{service}.out",
            )
        coordinator = running["coordinator"]
        coordinator.wait(600)
        codes = {s: running[s].wait(120) for s in order}
        # The PKI step again, as on a second `docker compose up`: it keeps the CA.
        again = subprocess.run(
            _container(network, volumes_dir, "pki", services["pki"], services["pki"]["command"]),
            env=_environment(services["pki"]),
            capture_output=True,
            text=True,
            timeout=120,
        )
    # Assert
    out = (logs / "coordinator.out").read_text()
    log = (logs / "coordinator.log").read_text()
    assert codes == dict.fromkeys(order, 0), {
        s: (logs / f"{s}.log").read_text()[-3000:] for s in order
    }
    rounds = [int(line.split()[0]) for line in out.splitlines() if line.strip()[:1].isdigit()]
    num_rounds = int(
        next(
            line.split("=")[1]
            for line in (ROOT / "examples/compose/coordinator.toml").read_text().splitlines()
            if line.startswith("num_rounds")
        )
    )
    assert rounds == list(range(1, num_rounds + 1))
    accuracy = float(out.split("final accuracy:")[1].split()[0])
    assert accuracy >= 0.8
    for silo in ("silo-1", "silo-2", "silo-3"):
        epsilon = float(out.split(f"{silo} epsilon:")[1].split()[0])
        assert 0 < epsilon <= 8.0
        assert (volumes_dir / f"{silo}-data" / "ledger.json").exists()
        # It reached the coordinator by service name, from its own address, across the bridge.
        assert f"silo={silo} peer=ipv4:{addresses[silo]}:" in log
    assert "federation epsilon:" in out
    assert again.returncode == 0 and "keeping every certificate" in again.stdout


def _wait_for(
    condition: str,
    dependency: str,
    services: dict[str, Any],
    running: dict[str, Watched],
    network: Network,
    volumes_dir: pathlib.Path,
    logs: pathlib.Path,
) -> None:
    process = running[dependency]
    if condition == "service_completed_successfully":
        code = process.wait(300)
        assert code == 0, (logs / f"{dependency}.log").read_text()
        return
    assert condition == "service_healthy", condition
    spec = services[dependency]
    test = spec["healthcheck"]["test"]
    assert test[0] == "CMD", "only exec-form healthchecks are rehearsed"
    # Docker runs the healthcheck every `interval` until it passes; here it runs once,
    # as soon as the coordinator says it listens, and must pass at once.
    process.wait_for(LISTENING, timeout_s=180)
    check = subprocess.run(
        _container(network, volumes_dir, dependency, spec, test[1:]),
        env=_environment(spec),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0 and check.stdout.strip() == "SERVING", check.stdout + check.stderr
