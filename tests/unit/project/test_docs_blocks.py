"""Every fenced block in README.md and docs/*.md says what it is, and what can be checked is.

The comment line before a block is its marker:

- ``<!-- checked: cli -->``: every command parses. ``fedpriv ...`` with fedpriv's own
  argument parser, ``make T`` names a Makefile target, ``python PATH`` names a file.
- ``<!-- checked: cli-session -->``: commands with what they print; the lines that
  start with ``fedpriv`` parse.
- ``<!-- checked: toml coordinator -->`` / ``silo``: a whole config that fedpriv's
  parser accepts; ``coordinator-part`` / ``silo-part``: tables that it accepts when
  added to a minimal config.
- ``<!-- checked: python -->``: compiles, and every name it imports from fedpriv exists.
- ``<!-- output: COMMAND -->``: what COMMAND printed (``docs/refresh_samples.py``
  refreshes the README's); round tables must have the columns the coordinator prints.
- ``<!-- file: PATH -->``: a file of docs/flower.md's app (tests/integration/test_flower_doc.py).
- ``<!-- checked: flower-run -->`` / ``flower-config``: Flower's own commands and its
  connection config, on docs/flower.md only; tests/integration/test_flower_doc.py runs them.
- ``<!-- illustrative: WHY -->``: not run here, and why (needs a cluster, say).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pathlib
import re
import shlex
import tomllib
from typing import Any

import pytest

from fedpriv.cli.main import _parser
from fedpriv.cli.round_table import _COLUMNS, _WIDTHS
from fedpriv.client.config import ClientConfig
from fedpriv.coordinator import CoordinatorConfig

ROOT = pathlib.Path(__file__).resolve().parents[3]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!-- (checked: [\w-]+(?: [\w-]+)?|output: .+|file: \S+|illustrative: .+) -->")
KINDS = {
    "checked: cli",
    "checked: cli-session",
    "checked: python",
    "checked: toml coordinator",
    "checked: toml silo",
    "checked: toml coordinator-part",
    "checked: toml silo-part",
    "checked: flower-run",
    "checked: flower-config",
}
FLOWER_PROGRAMS = {"flower-superlink", "flower-supernode", "flwr"}
MINIMAL_SILO = {"coordinator": {"address": "fl.example.org:7443"}}


def blocks(page: pathlib.Path) -> list[tuple[int, str, str]]:
    """(line, marker or '', text) for every fenced block of `page`."""
    lines = page.read_text().splitlines()
    found, start = [], None
    for number, line in enumerate(lines):
        if not line.startswith("```"):
            continue
        if start is None:
            start = number
            continue
        before = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        marker = MARKER.fullmatch(before.strip())
        found.append(
            (start + 1, marker.group(1) if marker else "", "\n".join(lines[start + 1 : number]))
        )
        start = None
    assert start is None, f"{page.name}: a block opened at line {start + 1} never closes"
    return found


BLOCKS = [
    (f"{page.relative_to(ROOT)}:{line}", marker, text)
    for page in PAGES
    for line, marker, text in blocks(page)
]


def of(kind: str) -> list[tuple[str, str]]:
    return [(where, text) for where, marker, text in BLOCKS if marker == kind]


def test_every_block_is_marked():
    unmarked = [where for where, marker, _ in BLOCKS if not marker]
    assert not unmarked, f"blocks without a marker comment before them: {unmarked}"
    unknown = [
        (where, marker)
        for where, marker, _ in BLOCKS
        if marker.startswith("checked: ") and marker not in KINDS
    ]
    assert not unknown
    files = [
        where for where, marker, _ in BLOCKS if marker.startswith(("file: ", "checked: flower-"))
    ]
    assert all(where.startswith("docs/flower.md:") for where in files), files


def test_flower_blocks_hold_flowers_commands_and_config():
    runs = of("checked: flower-run")
    assert runs
    for where, text in runs:
        programs = {words[0] for words in commands(text)}
        assert programs <= FLOWER_PROGRAMS, f"{where}: {programs - FLOWER_PROGRAMS}"
    for where, text in of("checked: flower-config"):
        assert tomllib.loads(text)["superlink"], where


def commands(text: str) -> list[str]:
    """The commands of a shell block: continuations joined, prompts and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip().removeprefix("$ ")
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


MAKE_TARGETS = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), flags=re.M))


def check_command(words: list[str]) -> None:
    program, *args = words
    if program == "fedpriv":
        try:
            _parser().parse_args(args)
        except SystemExit as exit:
            raise AssertionError(f"fedpriv does not accept: {shlex.join(words)}") from exit
    elif program == "torchrun":
        # torchrun's own parser, then the fedpriv command it starts (-m fedpriv ...)
        from torch.distributed.run import get_args_parser

        try:
            run = get_args_parser().parse_args(args)
        except SystemExit as exit:
            raise AssertionError(f"torchrun does not accept: {shlex.join(words)}") from exit
        assert run.module and run.training_script == "fedpriv", shlex.join(words)
        check_command(["fedpriv", *run.training_script_args])
    elif program == "make":
        targets = [a for a in args if "=" not in a]
        assert targets and set(targets) <= MAKE_TARGETS, shlex.join(words)
    elif program.endswith("python"):
        assert (ROOT / args[0]).is_file(), shlex.join(words)
    elif program != "cd":
        raise AssertionError(f"not a command this check knows; mark the block: {shlex.join(words)}")


@pytest.mark.parametrize(("where", "text"), of("checked: cli"), ids=lambda v: str(v)[:40])
def test_cli_blocks_parse(where, text):
    found = commands(text)
    assert found, where
    for words in found:
        check_command(words)


@pytest.mark.parametrize(("where", "text"), of("checked: cli-session"), ids=lambda v: str(v)[:40])
def test_the_commands_of_cli_sessions_parse(where, text):
    found = [words for words in commands(text) if words[0] == "fedpriv"]
    assert found, where
    for words in found:
        check_command(words)


def test_a_wrong_command_fails_the_check():
    with pytest.raises(AssertionError, match="fedpriv does not accept"):
        check_command(["fedpriv", "coordinator", "--confg", "x.toml"])
    with pytest.raises(AssertionError, match="fedpriv does not accept"):
        check_command(["torchrun", "--standalone", "-m", "fedpriv", "client", "--ap", "m:f"])
    with pytest.raises(AssertionError):
        check_command(["make", "no-such-target"])


def _merged(base: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in part.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def parse_config(kind: str, text: str, base_dir: pathlib.Path) -> None:
    data = tomllib.loads(text)
    if kind.endswith("silo"):
        ClientConfig.from_dict(data, base_dir=base_dir)
    elif kind.endswith("silo-part"):
        ClientConfig.from_dict(_merged(MINIMAL_SILO, data), base_dir=base_dir)
    elif kind.endswith("coordinator"):
        CoordinatorConfig.from_dict(data, base_dir=base_dir)
    else:
        minimal = {"model": {"factory": "pkg.mod:make"}}
        CoordinatorConfig.from_dict(_merged(minimal, data), base_dir=base_dir)


TOML = [
    (where, marker, text) for where, marker, text in BLOCKS if marker.startswith("checked: toml")
]


@pytest.mark.parametrize(("where", "kind", "text"), TOML, ids=[w for w, _, _ in TOML])
def test_toml_blocks_are_accepted_by_fedprivs_parser(where, kind, text, tmp_path):
    parse_config(kind, text, tmp_path)


def test_a_toml_block_with_a_typo_fails_the_check(tmp_path):
    with pytest.raises(Exception, match="did you mean 'num_rounds'"):
        parse_config("checked: toml coordinator-part", "[rounds]\nnum_round = 3\n", tmp_path)


@pytest.mark.parametrize(("where", "text"), of("checked: python"), ids=lambda v: str(v)[:40])
def test_python_blocks_compile_and_import_what_exists(where, text):
    tree = ast.parse(text, where)
    compile(tree, where, "exec")
    used = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedpriv"):
            module = importlib.import_module(node.module or "")
            for alias in node.names:
                assert hasattr(module, alias.name), f"{where}: {node.module} has no {alias.name}"
                used += 1
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fedpriv"):
                    importlib.import_module(alias.name)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "fedpriv"
        ):
            assert hasattr(importlib.import_module("fedpriv"), node.attr), f"{where}: {node.attr}"
            used += 1
    assert used, f"{where} uses nothing of fedpriv"


HEADER = "  ".join(f"{c:>{w}}" for c, w in zip(_COLUMNS, _WIDTHS, strict=True))


def test_sample_round_tables_have_the_columns_the_coordinator_prints():
    tables = [
        (where, text)
        for where, marker, text in BLOCKS
        if marker.startswith("output: ") and text.lstrip().startswith("round ")
    ]
    assert len(tables) >= 2
    for where, text in tables:
        header, *rows = text.splitlines()
        assert header == HEADER, f"{where}: the header is not what the coordinator prints"
        for row in rows:
            if row.strip()[:1].isdigit() and not row.startswith(("final", "silo")):
                assert len(row.split()) == len(_COLUMNS), f"{where}: {row}"


def test_illustrative_blocks_say_why():
    for where, marker, _ in BLOCKS:
        if marker.startswith("illustrative"):
            assert len(marker.split(":", 1)[1].strip()) >= 5, where


def test_the_init_sample_is_what_fedpriv_init_prints(tmp_path, monkeypatch, capsys):
    from fedpriv.cli.main import main

    ((where, text),) = of("output: fedpriv init myfed")
    monkeypatch.chdir(tmp_path)
    assert main(["init", "myfed"]) == 0
    printed = capsys.readouterr().out.replace(str(tmp_path), "/home/you")
    shown = text.split("...\n", 1)[1]
    assert printed.endswith(shown + "\n"), f"{where} drifted from what fedpriv init prints"


def test_the_refresh_script_keeps_the_table_ends_and_folds_other_silos():
    spec = importlib.util.spec_from_file_location("refresh", ROOT / "docs" / "refresh_samples.py")
    assert spec is not None and spec.loader is not None
    refresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(refresh)
    stdout = "\n".join(
        [
            "digits federation: 3 silos, 3 rounds, mTLS, no DP; files in /tmp/x",
            HEADER,
            *(f"{r:>5}  row" for r in (1, 2, 3)),
            "round 3/3 training: 1 of 3 in, 0.10 MB; waiting for silo-2",
            "final accuracy: 0.900",
            "silo-1 epsilon: 1.0 (...)",
            "silo-2 epsilon: 1.1 (...)",
            "silo-3 epsilon: 1.2 (...)",
            "federation epsilon: 9.0 (...)",
            "all processes exited cleanly",
            "removed /tmp/x (--keep or --workdir DIR keeps the state, logs and plots)",
        ]
    )
    assert refresh.sample(stdout).splitlines() == [
        HEADER,
        "    1  row",
        "  ...",
        "    3  row",
        "final accuracy: 0.900",
        "silo-1 epsilon: 1.0 (...)",
        "...",
        "federation epsilon: 9.0 (...)",
    ]
