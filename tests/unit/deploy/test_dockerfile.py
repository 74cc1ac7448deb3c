"""The Dockerfile, checked with BuildKit's own parser where no container engine runs.

.ci/run builds the image when `docker info` answers and says so; without an engine
(the usual CI machine) these tests are what checks it, and .ci/run says that too.
"""

from __future__ import annotations

import fnmatch
import pathlib
import shlex

import dockerfile
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[3]
COMMANDS = dockerfile.parse_file(str(ROOT / "Dockerfile"))


def instructions(name: str) -> list[dockerfile.Command]:
    return [c for c in COMMANDS if c.cmd == name]


def ignored(path: str) -> bool:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)


def test_the_base_image_is_pinned_and_everything_copied_exists():
    (base,) = instructions("FROM")
    image, _, tag = base.value[0].partition(":")
    assert image == "python" and tag and tag != "latest"
    for copy in instructions("COPY"):
        *sources, _ = copy.value
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not ignored(source), f"{source} is in .dockerignore"
    # node_modules is the Node silo example's, installed by npm: not for the image
    assert ignored("examples/node/node_modules")


def test_the_install_uses_the_pinned_cpu_builds():
    (install,) = [r for r in instructions("RUN") if "pip install" in r.value[0]]
    words = shlex.split(install.value[0])
    assert words[words.index("-c") + 1] == "constraints.txt"
    assert "https://download.pytorch.org/whl/cpu" in words  # not PyPI's multi-GB CUDA build
    copied = {s for c in instructions("COPY") for s in c.value[:-1]}
    assert "constraints.txt" in copied


def test_nothing_runs_as_root_and_the_uid_is_the_one_kubernetes_expects():
    users = instructions("USER")
    assert users and users[-1].value[0] != "root"
    last_user = COMMANDS.index(users[-1])
    assert all(COMMANDS.index(r) < last_user for r in instructions("RUN"))
    (create,) = [r for r in instructions("RUN") if "useradd" in r.value[0]]
    words = shlex.split(create.value[0])
    uid = int(words[words.index("--uid") + 1])
    for manifest in ("coordinator.yaml", "silo.yaml"):
        docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / manifest).read_text()))
        pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("StatefulSet", "Job")]
        assert pods and all(p["securityContext"]["runAsUser"] == uid for p in pods)


def test_every_compose_volume_has_its_mount_point_owned_by_that_user():
    (create,) = [r for r in instructions("RUN") if "useradd" in r.value[0]]
    made = set(shlex.split(create.value[0].replace("&&", " ")))
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            target = volume.split(":")[1]
            assert target in made, f"{name}: {target} is not made (and chowned) in the image"


def test_the_default_command_is_the_cli():
    (cmd,) = instructions("CMD")
    assert cmd.json and cmd.value[0] == "fedpriv"
