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
    "cli": 5,
    "scaffold": 4,
    "run": 4,
    "coordinator": 3,
    "client": 3,
    "strategy": 2,
    "privacy": 2,
    "secagg": 2,
    "transport": 1,
    "wire": 1,
    "pki": 0,
    "atrest": 1,
    "v1": 0,
    "errors": 0,
    "_types": 0,
    "_config": 0,
    "storage": 0,
    "faults": 0,
    "names": 0,
    "_lazy": 0,
}
# The root facade (`from fedpriv import TorchClient`) sits above every layer: no module
# inside fedpriv may import a name from it.
ROOT_FACADE = max(LAYERS.values()) + 1


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


def _imported(node: ast.AST) -> list[list[str]]:
    """The dotted fedpriv names an import statement reaches, one list of parts each.

    ``from fedpriv import errors`` reaches fedpriv.errors; ``from fedpriv import
    ConfigError`` reaches the root facade itself (["fedpriv"]).
    """
    if isinstance(node, ast.Import):
        return [a.name.split(".") for a in node.names]
    if not isinstance(node, ast.ImportFrom) or not node.module or node.level:
        return []
    if node.module != "fedpriv":
        return [node.module.split(".")]
    return [["fedpriv", a.name] if a.name in LAYERS else ["fedpriv"] for a in node.names]


def test_every_package_and_top_level_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")} | {
        p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()
    }
    assert sorted(modules - set(LAYERS)) == []


def test_imports_only_flow_downward():
    violations = []
    for module, path in _modules():
        parts = module.split(".")
        if len(parts) < 2 or parts[1] == "__main__":
            continue
        own = LAYERS[parts[1]]
        if parts[1] == "v1":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            for t in _imported(node):
                if t[0] != "fedpriv" or (len(t) > 1 and t[1] == parts[1]):
                    continue
                level = ROOT_FACADE if len(t) == 1 else LAYERS.get(t[1], ROOT_FACADE)
                if level > own or (level == own and own > 0):
                    violations.append(f"{module} imports {'.'.join(t)}")
    assert violations == []


def test_only_the_adapters_import_flwr():
    offenders = [
        m for m, p in _modules() if "import flwr" in p.read_text() or "from flwr" in p.read_text()
    ]
    # The adapters: fedpriv.client.flower, fedpriv.client.flower_app, fedpriv.strategy.flower, ...
    assert all(m.split(".")[-1].startswith("flower") for m in offenders), offenders


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


def _public_names(path: pathlib.Path) -> set[str]:
    """What a package's __init__ binds for its users: its imports, classes, functions, values.

    Names that start with an underscore, and imports from private modules
    (``fedpriv._lazy``) or of typing helpers, are its own business.
    """
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` imports of lazily exported names
            body = node.body
        else:
            body = [node]
        for item in body:
            if isinstance(item, ast.FunctionDef | ast.ClassDef):
                names.add(item.name)
            elif isinstance(item, ast.Assign | ast.AnnAssign):
                targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(item, ast.ImportFrom) and item.module:
                private = any(part.startswith("_") for part in item.module.split("."))
                if not private and item.module not in ("typing", "__future__"):
                    names.update(a.asname or a.name for a in item.names)
    return {n for n in names if not n.startswith("_")} | ({"__version__"} & names)


PACKAGES = sorted((m, p) for m, p in _modules() if p.name == "__init__.py" and m != "fedpriv.v1")


@pytest.mark.parametrize(("module", "path"), PACKAGES, ids=[m for m, _ in PACKAGES])
def test_all_lists_exactly_the_public_names(module, path):
    imported = importlib.import_module(module)
    assert sorted(set(imported.__all__) ^ _public_names(path)) == []
    assert sorted(set(imported.__all__) - set(dir(imported))) == []


def test_the_root_api_has_the_names_a_user_needs_and_imports_no_torch():
    code = (
        "import sys, fedpriv; torch_loaded = 'torch' in sys.modules; "
        "from fedpriv import TorchClient, LocalDP, PrivacyBudget, TLSConfig, CentralDP, FedAdam; "
        "from fedpriv.privacy import LocalDP as Again; "
        "print(torch_loaded, Again is LocalDP, TorchClient.__module__)"
    )
    out = __import__("subprocess").run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.split() == ["False", "True", "fedpriv.client.torch"]


def test_test_modules_have_unique_basenames():
    # tests/ has no __init__.py files below it, so pytest imports each test module by its
    # basename: two files with one name fail collection, in whichever run meets both.
    names: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        names.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in names.items() if len(paths) > 1} == {}
