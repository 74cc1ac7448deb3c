"""The coordinator's console output: the round table, then the epsilons with their units."""

from __future__ import annotations

import math
import sys
from typing import Any

__all__ = ["RoundPrinter", "print_epsilons", "progress_line"]

_COLUMNS = (
    "round",
    "joined",
    "in/sel",
    "out",
    "MB in",
    "loss",
    "accuracy",
    "seconds",
    "max silo eps",
    "fed eps",
)
_WIDTHS = (5, 6, 6, 3, 8, 8, 8, 8, 12, 8)
# On a narrow terminal the live table leaves out columns in this order rather than cut
# a figure; round, in/sel, accuracy and the silos' epsilon always stay.
_DROP_ORDER = ("joined", "out", "MB in", "seconds", "loss", "fed eps")
_SHOWN_ROWS = 30
_WAITING_NAMES = 4  # silos named in the progress line, then "and N more"
# Without a live table, a phase waiting this long gets a progress line, and again after
# as long (so logs show a stalled round without a line per poll).
_PLAIN_PROGRESS_S = 30.0


def progress_line(status: Any) -> str | None:
    """What the federation is doing between rounds, in one line (None once it is over)."""
    if status.state in ("finished", "stopped"):
        return None
    if status.state == "waiting":
        live = sum(1 for silo in status.silos if silo.live)
        return (
            f"round {status.round}/{status.num_rounds}: waiting for silos "
            f"({live} live, {status.min_clients} needed)"
        )
    in_phase = [silo for silo in status.silos if silo.round_outcome]
    pending = [silo.name for silo in in_phase if silo.round_outcome == "pending"]
    line = (
        f"round {status.round}/{status.num_rounds} {status.state}: "
        f"{len(in_phase) - len(pending)} of {len(in_phase)} in, "
        f"{status.bytes_received / 1e6:.2f} MB"
    )
    if pending:
        named = ", ".join(pending[:_WAITING_NAMES])
        more = len(pending) - _WAITING_NAMES
        line += f"; waiting for {named}" + (f" and {more} more" if more > 0 else "")
    return line


def _table_width(table: Any) -> int:
    from rich.console import Console
    from rich.measure import Measurement

    console = Console(width=10_000)
    return Measurement.get(console, console.options, table).maximum


class RoundPrinter:
    """The round table: a live rich table on a terminal, one plain line per round otherwise."""

    def __init__(self, *, quiet: bool, live: bool | None = None) -> None:
        self._quiet = quiet
        self._header = False
        self.last_accuracy: float | None = None
        self.silo_epsilon: dict[str, tuple[float, float]] = {}
        # The RDP bound each release also carries, shown beside the tight figure.
        self.silo_epsilon_rdp: dict[str, float] = {}
        self.federation_epsilon: tuple[float, float] | None = None
        self.federation_epsilon_rdp: float | None = None
        self.federation_assumption = ""
        self.last_accepted = 0
        self.rounds_without_dp = 0
        self._rows: list[tuple[str, ...]] = []
        self._progress: str | None = None
        self._phase: tuple[str, int] | None = None
        self._phase_seen_s = 0.0
        self._printed_progress_s = -math.inf
        self._live: Any = None
        if not quiet and (sys.stdout.isatty() if live is None else live):
            from rich.live import Live

            self._live = Live(self._table(), auto_refresh=False)
            self._live.start()

    def _table(self, width: int | None = None) -> Any:
        """The rich table, leaving out columns (in ``_DROP_ORDER``) until it fits ``width``."""
        if width is None:
            width = self._live.console.width if self._live is not None else 10_000
        shown = list(_COLUMNS)
        table = self._build(shown)
        for name in _DROP_ORDER:
            if _table_width(table) <= width:
                break
            shown.remove(name)
            table = self._build(shown)
        return table

    def _build(self, shown: list[str]) -> Any:
        from rich.table import Table

        table = Table(title="fedpriv rounds", caption=self._progress)
        keep = [i for i, name in enumerate(_COLUMNS) if name in shown]
        for i in keep:
            table.add_column(_COLUMNS[i], justify="right", no_wrap=True)
        for row in self._rows[-_SHOWN_ROWS:]:
            table.add_row(*(row[i] for i in keep))
        return table

    def progress(self, status: Any) -> None:
        """Show what the current round is waiting for (a caption live, a line otherwise)."""
        line = progress_line(status)
        if self._quiet:
            return
        if self._live is not None:
            if line != self._progress:
                self._progress = line
                self._live.update(self._table(), refresh=True)
            return
        # Plain lines go to logs, between the table's rows: only a phase that has been
        # waiting a while gets one, then one every _PLAIN_PROGRESS_S.
        phase = (status.state, status.round)
        if phase != self._phase:
            self._phase, self._phase_seen_s = phase, status.uptime_s
            return
        waited = status.uptime_s - self._phase_seen_s
        if line is not None and waited >= _PLAIN_PROGRESS_S:
            if status.uptime_s - self._printed_progress_s >= _PLAIN_PROGRESS_S:
                print(line, flush=True)
                self._printed_progress_s = status.uptime_s

    def _emit(self, row: tuple[str, ...]) -> None:
        if self._quiet:
            return
        self._rows.append(row)
        if self._live is not None:
            self._live.update(self._table(), refresh=True)
            return
        if not self._header:
            print(
                "  ".join(f"{c:>{w}}" for c, w in zip(_COLUMNS, _WIDTHS, strict=True)), flush=True
            )
            self._header = True
        print("  ".join(f"{c:>{w}}" for c, w in zip(row, _WIDTHS, strict=True)), flush=True)

    def close(self) -> None:
        """Stop the live table (a no-op without one)."""
        if self._live is not None:
            self._live.stop()
            self._live = None

    def round_completed(self, summary: Any) -> None:
        """Add a completed round's row and remember its epsilons and accuracy."""
        for silo, values in summary.silo_metrics.items():
            if "epsilon" in values:
                self.silo_epsilon[silo] = (
                    float(values["epsilon"]),
                    float(values.get("delta", 0.0)),
                )
                if "epsilon_rdp" in values:
                    self.silo_epsilon_rdp[silo] = float(values["epsilon_rdp"])
        epsilons = [float(v["epsilon"]) for v in summary.silo_metrics.values() if "epsilon" in v]
        metrics = summary.evaluation_metrics or summary.fit_metrics
        # None when no silo released one (under DP a silo sends no un-noised loss).
        loss = metrics.get("loss", summary.fit_metrics.get("train_loss"))
        accuracy = metrics.get("accuracy")
        if accuracy is not None:
            self.last_accuracy = accuracy
        federation = summary.federation_metrics
        shown_federation = "-"
        if "epsilon" in federation:
            self.federation_epsilon = (federation["epsilon"], federation.get("delta", 0.0))
            self.federation_epsilon_rdp = federation.get("epsilon_rdp")
            self.rounds_without_dp = int(federation.get("rounds_without_dp", 0))
            colluders = int(federation.get("colluders_tolerated", 0))
            self.federation_assumption = (
                f", holds with up to {colluders} silos colluding with the coordinator"
                if colluders
                else ""
            )
            shown_federation = (
                format(federation["epsilon"], ".3f")
                if math.isfinite(federation["epsilon"])
                else "none"
            )
        self.last_accepted = summary.accepted
        out = summary.rejected + summary.dropped + summary.declined
        self._emit(
            (
                str(summary.round),
                str(summary.joined),
                f"{summary.accepted}/{summary.selected}",
                str(out),
                format(summary.bytes_received / 1e6, ".2f"),
                "-" if loss is None else format(loss, ".4f"),
                "-" if accuracy is None else format(accuracy, ".4f"),
                format(summary.duration_s, ".2f"),
                format(max(epsilons), ".3f") if epsilons else "-",
                shown_federation,
            )
        )

    def round_failed(self, round: int, reason: str) -> None:
        """Show that a round failed and why."""
        if self._live is not None:
            self._live.console.log(f"round {round} failed: {reason}")
        elif not self._quiet:
            print(f"{round:>5}  failed: {reason}", flush=True)


# Above this a silo-level epsilon protects nothing in practice; the demo says why.
_LARGE_EPSILON = 10.0


def _rdp_beside(value: float | None) -> str:
    return "" if value is None else f"; RDP bound {value:.3f}"


def print_epsilons(printer: RoundPrinter) -> None:
    """Record-level epsilons first, then the federation's, each with what it protects."""
    if printer.silo_epsilon:
        print(
            "record-level privacy: each silo's DP-SGD guarantee for any one of its records "
            "(one record added or removed), from the silo's own ledger",
            flush=True,
        )
    for silo, (epsilon, delta) in sorted(printer.silo_epsilon.items()):
        print(
            f"{silo} epsilon: {epsilon:.3f} (delta {delta:g}, sample-level, from its ledger"
            f"{_rdp_beside(printer.silo_epsilon_rdp.get(silo))})",
            flush=True,
        )
    if printer.federation_epsilon is not None and printer.rounds_without_dp:
        print(
            f"federation epsilon: none ({printer.rounds_without_dp} rounds ran without DP, "
            "so no silo-level guarantee covers the model; see fedpriv report)",
            flush=True,
        )
    elif printer.federation_epsilon is not None:
        epsilon, delta = printer.federation_epsilon
        print(
            f"federation epsilon: {epsilon:.3f} (delta {delta:g}, silo-level: the unit is each "
            f"silo's whole dataset, from the coordinator's accountant"
            f"{_rdp_beside(printer.federation_epsilon_rdp)}{printer.federation_assumption})",
            flush=True,
        )
        if epsilon > _LARGE_EPSILON:
            print(
                "  it is large because hiding a whole silo's data takes noise the size of one "
                f"silo's update in a sum of only {printer.last_accepted} updates; silo-level DP "
                "becomes meaningful with tens to hundreds of silos",
                flush=True,
            )
