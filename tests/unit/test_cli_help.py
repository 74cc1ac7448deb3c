"""`fedpriv --help` and each command's help are written for users, with an example that parses."""

from __future__ import annotations

import importlib
import shlex

import pytest

# The module, not the `main` function that fedpriv.cli exports under the same name.
cli = importlib.import_module("fedpriv.cli.main")


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        cli._parser().parse_args([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_speaks_to_users_not_of_the_module(capsys):
    text = _help(capsys)
    assert "no logic" not in text and "argument parsing" not in text
    assert "without moving their data" in text
    assert "fedpriv init" in text and "COMMAND --help" in text


@pytest.mark.parametrize("command", sorted(cli._EXAMPLES))
def test_every_command_shows_an_example_that_parses(capsys, command):
    text = _help(capsys, command)
    assert "example:" in text
    for line in cli._EXAMPLES[command].splitlines():
        words = shlex.split(line.strip())
        assert words[0] == "fedpriv" and words[1] == command
        cli._parser().parse_args(words[1:])


def test_every_command_has_an_example():
    commands = next(
        a for a in cli._parser()._actions if a.__class__.__name__ == "_SubParsersAction"
    )
    assert sorted(commands.choices) == sorted(cli._EXAMPLES)
