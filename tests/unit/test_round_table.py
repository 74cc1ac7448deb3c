"""The coordinator's round table: plain lines without a terminal, a rich table with one."""

from __future__ import annotations

import io

from rich.console import Console

from fedpriv.cli.round_table import RoundPrinter
from fedpriv.coordinator import RoundSummary


def summary(round: int) -> RoundSummary:
    return RoundSummary(
        round=round,
        num_rounds=3,
        selected=3,
        joined=3,
        accepted=2,
        rejected=1,
        dropped=0,
        declined=0,
        fit_metrics={"train_loss": 0.5},
        evaluation_metrics={"loss": 0.25, "accuracy": 0.9},
        silo_metrics={"a": {"epsilon": 1.5, "delta": 1e-5}},
        federation_metrics={"epsilon": 7.0, "delta": 1e-5},
        bytes_received=2_000_000,
        duration_s=1.0,
    )


def test_plain_table_has_one_line_per_round(capsys):
    printer = RoundPrinter(quiet=False, live=False)
    printer.round_completed(summary(1))
    printer.round_completed(summary(2))
    printer.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["round", "joined", "in/sel", "out"]
    assert lines[1].split() == [
        "1",
        "3",
        "2/3",
        "1",
        "2.00",
        "0.2500",
        "0.9000",
        "1.00",
        "1.500",
        "7.000",
    ]
    assert printer.last_accuracy == 0.9 and printer.federation_epsilon == (7.0, 1e-5)


def test_quiet_prints_nothing(capsys):
    printer = RoundPrinter(quiet=True, live=True)
    printer.round_completed(summary(1))
    printer.close()
    assert capsys.readouterr().out == ""


def test_live_table_renders_every_round():
    printer = RoundPrinter(quiet=False, live=True)
    for round in (1, 2, 3):
        printer.round_completed(summary(round))
    buffer = io.StringIO()
    Console(file=buffer, width=120).print(printer._table())
    printer.close()
    text = buffer.getvalue()
    assert "fedpriv rounds" in text and text.count("2/3") == 3 and "7.000" in text
