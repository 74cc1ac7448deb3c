"""The project's own rules: generated code is fresh, public names exist, imports flow down."""

from __future__ import annotations

import ast
import importlib
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
PACKAGE = ROOT / "fedpriv"
# Lower layers never import higher ones (STYLE.md §1).
LAYERS = {
    "cli": 4,
    "coordinator": 3,
    "client": 3,
    "strategy": 2,
    "privacy": 2,
    "secagg": 2,
    "transport": 1,
    "wire": 1,
    "pki": 1,
    "atrest": 1,
    "v1": 0,
    "errors": 0,
    "_types": 0,
    "_config": 0,
    "storage": 0,
    "faults": 0,
}


def test_generated_protocol_code_is_up_to_date(tmp_path):
    sys.path.insert(0, str(ROOT / "proto"))
    try:
        generate = importlib.import_module("generate").generate
    finally:
        sys.path.remove(str(ROOT / "proto"))
    fresh = generate(tmp_path)
    committed = sorted(
        p
        for p in (PACKAGE / "v1").iterdir()
        if p.name.endswith((".py", ".pyi")) and p.name != "__init__.py"
    )
    assert [p.name for p in fresh] == [p.name for p in committed]
    for new, old in zip(fresh, committed, strict=True):
        assert new.read_text() == old.read_text(), f"{old.name} is stale: run `make proto`"


def _modules():
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(p for p in parts if p != "__init__"), path


@pytest.mark.parametrize("module", sorted({m for m, p in _modules() if p.name == "__init__.py"}))
def test_every_all_entry_exists(module):
    imported = importlib.import_module(module)
    exported = getattr(imported, "__all__", [])
    missing = [name for name in exported if not hasattr(imported, name)]
    assert missing == []
    assert len(exported) == len(set(exported))


def test_imports_only_flow_downward():
    violations = []
    for module, path in _modules():
        parts = module.split(".")
        if len(parts) < 2 or parts[1] == "__main__":
            continue
        own = LAYERS.get(parts[1])
        if own is None or parts[1] == "v1":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                t = target.split(".")
                if t[0] != "fedpriv" or len(t) < 2 or t[1] == parts[1]:
                    continue
                level = LAYERS.get(t[1], -1)
                if level > own or (level == own and own > 0):
                    violations.append(f"{module} imports {target}")
    assert violations == []


def test_only_the_adapters_import_flwr():
    offenders = [
        m for m, p in _modules() if "import flwr" in p.read_text() or "from flwr" in p.read_text()
    ]
    assert all(m.endswith(".flower") for m in offenders), offenders


def test_no_hazmat_outside_the_recipe_modules():
    offenders = [
        m
        for m, p in _modules()
        if "hazmat" in p.read_text() and m.split(".")[1] not in ("pki", "secagg", "atrest")
    ]
    assert offenders == []


def test_versions_agree():
    import fedpriv
    from fedpriv.client.runtime import SDK_VERSION

    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{fedpriv.__version__}"' in pyproject
    assert SDK_VERSION == fedpriv.__version__


def test_grpc_message_limit_leaves_room_for_the_largest_chunk():
    from fedpriv.transport.options import MAX_MESSAGE_BYTES
    from fedpriv.wire import MAX_CHUNK_BYTES

    assert MAX_MESSAGE_BYTES >= MAX_CHUNK_BYTES + (1 << 20)


def test_coordinator_does_not_import_torch():
    # torch costs the coordinator hundreds of MB; it is imported only for torch models.
    code = "import sys, fedpriv.coordinator, fedpriv.cli.main; print('torch' in sys.modules)"
    out = __import__("subprocess").run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT
    )
    assert out.stdout.strip() == "False", out.stderr
