"""``fedpriv report RUN_DIR``: PNG plots of a run from the coordinator's ``metrics.jsonl``."""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import sqlite3
from typing import Any

from fedpriv.cli.status import format_discarded, format_rounds
from fedpriv.coordinator.privacy_record import discarded_updates
from fedpriv.errors import ConfigError

__all__ = ["describe_discarded", "describe_guarantee", "write_report"]


def _rounds(path: pathlib.Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise ConfigError(f"{path} does not exist: point fedpriv report at a coordinator state dir")
    completed: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{number}: not JSON: {err}") from err
        if record.get("event") == "round_completed":
            completed[int(record["round"])] = record  # a rerun after a crash replaces it
    return [completed[r] for r in sorted(completed)]


def _private(record: dict[str, Any]) -> bool:
    """Whether a round ran with silo-level DP (logs without ``privacy``: it stored an epsilon)."""
    if "privacy" in record:
        return bool(record["privacy"] != "none")
    return "epsilon" in record.get("federation", {})


def _without_dp(rounds: list[dict[str, Any]]) -> list[int]:
    """Rounds without silo-level DP in a run where some round had it (else none)."""
    if not any(_private(r) for r in rounds):
        return []
    return [int(r["round"]) for r in rounds if not _private(r)]


def describe_guarantee(run_dir: pathlib.Path) -> str | None:
    """One line on the federation-level (silo-level) epsilon of a run; None if it claims none.

    Raises:
        ConfigError: No ``metrics.jsonl`` in `run_dir`.
    """
    rounds = _rounds(run_dir / "metrics.jsonl")
    private = [r for r in rounds if _private(r)]
    if not private:
        return None
    without = _without_dp(rounds)
    last = private[-1]["federation"]
    if without:
        which = f"round{'s' if len(without) > 1 else ''} {format_rounds(without)}"
        line = f"federation epsilon: none ({which} ran without DP, so no guarantee covers the model"
        alone = last.get("epsilon_dp_rounds")
        if alone is not None:
            line += f"; the rounds with DP alone: {alone:.3f} at delta {last.get('delta', 0):g}"
        return line + ")"
    return (
        f"federation epsilon: {last['epsilon']:.3f} (delta {last.get('delta', 0):g}, "
        f"silo-level, after round {private[-1]['round']})"
    )


def describe_discarded(run_dir: pathlib.Path) -> list[str]:
    """Lines naming the updates failed attempts threw away, from the run's state database.

    None when the folder has no ``state.sqlite3`` (a copied ``metrics.jsonl`` alone).
    """
    database = run_dir / "state.sqlite3"
    if not database.exists():
        return []
    # Read-only: a report never changes a coordinator's state, running or not.
    uri = f"file:{database.resolve()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        found = discarded_updates(db)
    return format_discarded([{"round": d.round, "silo": d.silo, "reason": d.reason} for d in found])


def write_report(run_dir: pathlib.Path, out_dir: pathlib.Path) -> dict[str, int]:
    """Write accuracy.png, epsilon.png and participation.png; return points plotted per file.

    Raises:
        ConfigError: No ``metrics.jsonl`` in `run_dir`, or it has no completed round.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = _rounds(run_dir / "metrics.jsonl")
    if not rounds:
        raise ConfigError(f"{run_dir / 'metrics.jsonl'} has no completed round yet")
    out_dir.mkdir(parents=True, exist_ok=True)
    numbers = [r["round"] for r in rounds]
    points: dict[str, int] = {}

    figure, left = plt.subplots(figsize=(7, 4))
    count = 0
    for source in ("evaluate", "fit"):
        series = [(r["round"], r[source].get("accuracy")) for r in rounds]
        series = [(x, y) for x, y in series if y is not None]
        if series:
            left.plot(*zip(*series, strict=True), marker="o", label=f"accuracy ({source})")
            count += len(series)
            break
    right = left.twinx()
    for source, key in (("evaluate", "loss"), ("fit", "train_loss")):
        series = [(r["round"], r[source].get(key)) for r in rounds]
        series = [(x, y) for x, y in series if y is not None]
        if series:
            right.plot(*zip(*series, strict=True), marker="s", color="tab:red", label=key)
            count += len(series)
            break
    left.set_xlabel("round")
    left.set_ylabel("accuracy")
    right.set_ylabel("loss")
    figure.legend(loc="lower center", ncol=2)
    figure.tight_layout()
    figure.savefig(out_dir / "accuracy.png", dpi=100)
    plt.close(figure)
    points["accuracy.png"] = count

    figure, axes = plt.subplots(figsize=(7, 4))
    count = 0
    silos = sorted({s for r in rounds for s, v in r["silos"].items() if "epsilon" in v})
    for silo in silos:
        series = [
            (r["round"], r["silos"][silo]["epsilon"])
            for r in rounds
            if "epsilon" in r["silos"].get(silo, {})
        ]
        axes.plot(*zip(*series, strict=True), marker="o", label=f"{silo} (sample-level)")
        count += len(series)
    without = _without_dp(rounds)
    federation = [
        (r["round"], r["federation"].get("epsilon_dp_rounds", r["federation"]["epsilon"]))
        for r in rounds
        if "epsilon" in r["federation"]
    ]
    federation = [(x, y) for x, y in federation if math.isfinite(y)]
    if federation:
        axes.plot(
            *zip(*federation, strict=True),
            marker="s",
            linestyle="--",
            label="federation (silo-level)" + (", DP rounds only" if without else ""),
        )
        count += len(federation)
    if without:
        axes.set_title(
            f"federation epsilon: none (round{'s' if len(without) > 1 else ''} "
            f"{format_rounds(without)} ran without DP)"
        )
    axes.set_xlabel("round")
    axes.set_ylabel("epsilon")
    if count:
        axes.legend()
    else:
        axes.text(
            0.5, 0.5, "no differential privacy in this run", ha="center", transform=axes.transAxes
        )
    figure.tight_layout()
    figure.savefig(out_dir / "epsilon.png", dpi=100)
    plt.close(figure)
    points["epsilon.png"] = count

    figure, axes = plt.subplots(figsize=(7, 4))
    names = sorted({s for r in rounds for s in r["silos"]})
    count = 0
    for row, silo in enumerate(names):
        took_part = [r["round"] for r in rounds if silo in r["silos"]]
        axes.scatter(took_part, [row] * len(took_part), marker="s")
        count += len(took_part)
    axes.set_yticks(range(len(names)), names)
    axes.set_xticks(numbers)
    axes.set_xlabel("round")
    axes.set_title("accepted updates per silo")
    figure.tight_layout()
    figure.savefig(out_dir / "participation.png", dpi=100)
    plt.close(figure)
    points["participation.png"] = count
    return points
