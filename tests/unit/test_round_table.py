"""The coordinator's round table: plain lines without a terminal, a rich table with one."""

from __future__ import annotations

import dataclasses
import io

from rich.console import Console

from fedpriv.cli.round_table import RoundPrinter, progress_line
from fedpriv.coordinator import RoundSummary
from fedpriv.coordinator.status import FederationStatus, SiloState


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


def test_a_round_with_no_released_loss_shows_a_dash_not_nan(capsys):
    # Under DP with federated evaluation off, no silo sends a loss at all.
    private = dataclasses.replace(summary(1), fit_metrics={}, evaluation_metrics={})
    printer = RoundPrinter(quiet=False, live=False)
    printer.round_completed(private)
    printer.close()
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[5:7] == ["-", "-"] and "nan" not in row


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


def wide_summary(round: int) -> RoundSummary:
    """Figures as wide as a real run gives: hundreds of MB, epsilons in the hundreds."""
    return RoundSummary(
        round=round,
        num_rounds=100,
        selected=128,
        joined=128,
        accepted=127,
        rejected=1,
        dropped=0,
        declined=0,
        fit_metrics={"train_loss": 0.5},
        evaluation_metrics={"loss": 0.123456, "accuracy": 0.891234},
        silo_metrics={"a": {"epsilon": 123.456, "delta": 1e-5}},
        federation_metrics={"epsilon": 4567.891, "delta": 1e-5},
        bytes_received=812_345_678,
        duration_s=1234.5,
    )


def render(printer: RoundPrinter, width: int) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=width).print(printer._table(width))
    return buffer.getvalue()


def test_at_80_columns_every_shown_figure_is_whole_and_the_key_columns_stay(capsys):
    # Arrange: the rows (also printed as plain lines, which go to logs in full)
    printer = RoundPrinter(quiet=False, live=False)
    for round in (98, 99, 100):
        printer.round_completed(wide_summary(round))
    # Act
    text = render(printer, 80)
    # Assert: nothing is cut, the table fits, and what stays are the figures that matter
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80, text
    for figure in ("100", "127/128", "0.8912", "123.456"):
        assert figure in text, text
    wide = render(printer, 200)
    assert "…" not in wide
    for header in ("joined", "MB in", "seconds", "fed eps", "812.35", "4567.891", "1234.50"):
        assert header in wide, wide


def test_a_very_narrow_terminal_still_shows_whole_figures(capsys):
    printer = RoundPrinter(quiet=False, live=False)
    printer.round_completed(wide_summary(7))
    text = render(printer, 50)
    assert "0.8912" in text and "127/128" in text and "123.456" in text, text


def status(state: str, outcomes: dict[str, str], *, live: int = 3) -> FederationStatus:
    return FederationStatus(
        federation="demo",
        state=state,
        round=2,
        num_rounds=5,
        completed_rounds=1,
        min_clients=2,
        silos=[
            SiloState(name=name, seconds_since_seen=0.1, live=i < live, round_outcome=outcome)
            for i, (name, outcome) in enumerate(outcomes.items())
        ],
        last_round_metrics={},
        uptime_s=10.0,
        bytes_received=3_500_000,
    )


def test_the_progress_line_names_whom_the_round_waits_for():
    training = status("training", {"silo-1": "accepted", "silo-2": "pending", "silo-3": "pending"})
    assert progress_line(training) == (
        "round 2/5 training: 1 of 3 in, 3.50 MB; waiting for silo-2, silo-3"
    )
    many = status("training", {f"silo-{i}": "pending" for i in range(10)})
    assert progress_line(many).endswith("silo-0, silo-1, silo-2, silo-3 and 6 more")
    waiting = status("waiting", {"silo-1": "", "silo-2": ""}, live=1)
    assert progress_line(waiting) == "round 2/5: waiting for silos (1 live, 2 needed)"
    assert progress_line(status("finished", {})) is None


def test_plain_progress_prints_only_for_a_phase_that_waits_and_then_every_30_s(capsys):
    printer = RoundPrinter(quiet=False, live=False)
    waiting = {"silo-1": "accepted", "silo-2": "pending"}
    for uptime in (10.0, 20.0, 39.0):  # a round that takes under 30 s prints nothing
        printer.progress(dataclasses.replace(status("training", waiting), uptime_s=uptime))
    assert capsys.readouterr().out == ""
    for uptime in (40.0, 55.0, 70.0, 71.0):  # still waiting: a line at 30 s, then 30 s on
        printer.progress(dataclasses.replace(status("training", waiting), uptime_s=uptime))
    assert capsys.readouterr().out.splitlines() == [
        "round 2/5 training: 1 of 2 in, 3.50 MB; waiting for silo-2",
        "round 2/5 training: 1 of 2 in, 3.50 MB; waiting for silo-2",
    ]
    evaluating = dataclasses.replace(status("evaluating", waiting), uptime_s=75.0)
    printer.progress(evaluating)  # a new phase starts its own wait
    printer.progress(dataclasses.replace(evaluating, uptime_s=90.0))
    assert capsys.readouterr().out == ""


def test_the_live_table_shows_the_progress_as_its_caption():
    printer = RoundPrinter(quiet=False, live=True)
    printer.round_completed(summary(1))
    printer.progress(status("training", {"silo-1": "accepted", "silo-2": "pending"}))
    text = render(printer, 120)
    printer.close()
    assert "waiting for silo-2" in text and "2/3" in text
