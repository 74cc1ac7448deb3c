"""deploy/kubernetes: valid against a pinned Kubernetes schema, and consistent with fedpriv.

The schema check alone would pass manifests whose config names a file no volume
mounts, or a port nothing listens on; the checks below read the TOML in the
ConfigMaps with fedpriv's own parsers and hold every path, port and command to the
manifests' mounts, ports and the CLI.
"""

from __future__ import annotations

import copy
import pathlib
import tomllib
from typing import Any

import kubernetes_validate
import pytest
import yaml

from fedpriv._config import load_factory
from fedpriv.cli.main import _parser
from fedpriv.client.config import ClientConfig
from fedpriv.coordinator import CoordinatorConfig

ROOT = pathlib.Path(__file__).resolve().parents[3]
MANIFESTS = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes release the manifests promise to run on (docs/deploy.md).
KUBERNETES = "1.30.0"


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            found.append((f"{path.name}: {doc['kind']}/{doc['metadata']['name']}", doc))
    return found


DOCUMENTS = documents()


def one(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for _, d in DOCUMENTS if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.mark.parametrize(("where", "doc"), DOCUMENTS, ids=[w for w, _ in DOCUMENTS])
def test_every_manifest_is_valid_against_the_pinned_schema(where, doc):
    # strict: a misspelt or misplaced field is an error, not silently dropped
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_a_misspelt_or_mistyped_field_fails_the_schema_check():
    statefulset = copy.deepcopy(one("StatefulSet", "fedpriv-coordinator"))
    statefulset["spec"]["replica"] = 1  # misspelt: strict validation refuses unknown fields
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, KUBERNETES, strict=True)
    statefulset = copy.deepcopy(one("StatefulSet", "fedpriv-coordinator"))
    statefulset["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, KUBERNETES, strict=True)


def test_the_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    files = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert len(DOCUMENTS) >= 6


def mounts(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the volume mounted there (with its subPath)."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    (container,) = pod["spec"]["containers"]
    return {
        m["mountPath"]: {**volumes.get(m["name"], {"name": m["name"]}), "subPath": m.get("subPath")}
        for m in container["volumeMounts"]
    }


def mounted_from(path: pathlib.Path, table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The volume that holds `path`: the deepest mount at or above it."""
    for mount in sorted(table, key=len, reverse=True):
        if path == pathlib.Path(mount) or pathlib.Path(mount) in path.parents:
            return table[mount]
    raise AssertionError(f"{path} is on no volume")


def config_file(config_map: dict[str, Any], key: str) -> tuple[dict[str, Any], pathlib.Path]:
    return tomllib.loads(config_map["data"][key]), pathlib.Path("/etc/fedpriv")


def coordinator_config() -> CoordinatorConfig:
    data, base = config_file(one("ConfigMap", "fedpriv-coordinator-config"), "coordinator.toml")
    return CoordinatorConfig.from_dict(data, base_dir=base)


def test_the_coordinator_config_paths_ports_and_probe_agree_with_the_statefulset():
    # Arrange
    statefulset = one("StatefulSet", "fedpriv-coordinator")
    config_map = one("ConfigMap", "fedpriv-coordinator-config")
    pod = statefulset["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    table = mounts(pod)
    data, base = config_file(config_map, "coordinator.toml")
    config = CoordinatorConfig.from_dict(data, base_dir=base)  # fedpriv's own parser
    # Assert: one coordinator, its state on the claim template, its keys from a Secret
    assert statefulset["spec"]["replicas"] == 1
    claims = {c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]}
    assert mounted_from(config.state_dir, table)["name"] in claims
    assert config.tls is not None
    for path in (config.tls.ca, config.tls.cert, config.tls.key):
        assert "secret" in mounted_from(path, table), path
    # the command runs that file, from the ConfigMap
    args = _parser().parse_args(container["command"][1:])
    assert args.config == "/etc/fedpriv/coordinator.toml"
    assert table[args.config]["configMap"]["name"] == config_map["metadata"]["name"]
    assert table[args.config]["subPath"] == "coordinator.toml"
    # ports: gRPC where the config listens, Prometheus where it is annotated and served
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(config.address.rsplit(":", 1)[1]) == ports["grpc"]
    assert config.prometheus is not None
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert int(config.prometheus.rsplit(":", 1)[1]) == ports["metrics"]
    # the factory the coordinator builds round 0 from exists
    assert config.model.factory is not None and callable(
        load_factory(config.model.factory, field="f")
    )


def test_the_readiness_probe_asks_the_grpc_health_service_over_mtls():
    statefulset = one("StatefulSet", "fedpriv-coordinator")
    config_map = one("ConfigMap", "fedpriv-coordinator-config")
    pod = statefulset["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    table = mounts(pod)
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe[0] == "fedpriv"
    args = _parser().parse_args(probe[1:])
    assert args.health and args.command == "status"
    assert table[args.config]["subPath"] == "ops.toml"
    data, base = config_file(config_map, "ops.toml")
    ops = ClientConfig.from_dict(data, base_dir=base)
    coordinator = coordinator_config()
    assert ops.coordinator.rsplit(":", 1)[1] == coordinator.address.rsplit(":", 1)[1]
    for path in (ops.ca, ops.cert, ops.key):
        assert path is not None and "secret" in mounted_from(path, table), path
    assert "ops" in coordinator.operators


def test_the_silo_job_keeps_its_ledger_on_its_claim_and_joins_the_coordinator():
    # Arrange
    job = one("Job", "fedpriv-silo-1")
    config_map = one("ConfigMap", "fedpriv-silo-1-config")
    claim = one("PersistentVolumeClaim", "fedpriv-silo-1-ledger")
    pod = job["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    table = mounts(pod)
    data, base = config_file(config_map, "silo.toml")
    silo = ClientConfig.from_dict(data, base_dir=base)
    coordinator = coordinator_config()
    # Assert: one pod at a time; the ledger on the claim, the keys from a Secret
    assert job["spec"]["parallelism"] == 1 and pod["spec"]["restartPolicy"] == "OnFailure"
    assert silo.ledger is not None
    ledger_volume = mounted_from(silo.ledger, table)
    assert ledger_volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    for path in (silo.ca, silo.cert, silo.key):
        assert path is not None and "secret" in mounted_from(path, table), path
    # its certificate's name is an allowed silo; it dials the coordinator's Service and port
    assert silo.cert is not None and silo.cert.stem in (coordinator.allowed_silos or ())
    host, port = silo.coordinator.rsplit(":", 1)
    service = one("Service", host)
    assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
    # the command runs this config with an app that exists
    args = _parser().parse_args(container["command"][1:])
    assert args.config == "/etc/fedpriv/silo.toml" and table[args.config]["subPath"] == "silo.toml"
    assert callable(load_factory(args.app, field="--app"))


def test_nothing_runs_as_root_and_the_root_filesystem_is_read_only():
    for kind, name in (("StatefulSet", "fedpriv-coordinator"), ("Job", "fedpriv-silo-1")):
        pod = one(kind, name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}


def test_a_broken_manifest_fails_the_schema_check():
    # The check can fail: a misplaced field (replicas under the pod spec) is refused.
    statefulset = yaml.safe_load(yaml.safe_dump(one("StatefulSet", "fedpriv-coordinator")))
    statefulset["spec"]["template"]["spec"]["replicas"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, KUBERNETES, strict=True)
