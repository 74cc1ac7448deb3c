"""What the coordinator tells an experiment tracker: the vocabulary and the pure conversions.

- :func:`config_params`: the federation's configuration as flat ``dotted.key = text``
  parameters. Paths are logged as paths, never the files' contents (no key, no
  certificate), and ``tracking`` itself is left out, since a tracking URI may
  carry credentials.
- :func:`round_metrics`: one completed round as named scalars, logged with
  step = round number.
- :func:`final_metrics`: the last committed round's evaluation and federation
  figures, as the final model's record when the federation finishes.

Names keep to what every tracker accepts (letters, digits, ``_ - .`` and ``/``
between parts): anything else in a silo's name becomes ``_``.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

from fedpriv.coordinator.phases import RoundSummary

if TYPE_CHECKING:
    from fedpriv.coordinator.config import CoordinatorConfig
    from fedpriv.coordinator.store import Store

__all__ = [
    "RunStatus",
    "TrackingSink",
    "config_params",
    "final_metrics",
    "round_metrics",
    "safe_name",
]

# Left out of the parameters: a tracking URI may hold a user and password.
_NOT_LOGGED = frozenset({"tracking"})
_UNSAFE = re.compile(r"[^\w.\-]")


class RunStatus(enum.Enum):
    """How a tracked run ends (the values are MLflow's run statuses)."""

    FINISHED = "FINISHED"  # every round completed
    FAILED = "FAILED"  # a round failed max_failed_attempts times, or the coordinator crashed
    KILLED = "KILLED"  # stopped before the last round; a restart continues the run


class TrackingSink(Protocol):
    """One experiment tracker; called from the tracking thread only, never the round loop."""

    @property
    def name(self) -> str:
        """The sink's name for log messages (``mlflow``, ``tensorboard``)."""
        ...

    def start(self, params: Mapping[str, str]) -> None:
        """Open (or continue) the run and record the federation's parameters."""
        ...

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Record `values` at `step` (the round)."""
        ...

    def end(self, status: RunStatus, *, detail: str) -> None:
        """Mark the run ended with `status` (`detail` says why, for a failure)."""
        ...

    def close(self) -> None:
        """Release files and connections; the sink is not used again."""
        ...


def safe_name(*parts: str) -> str:
    """A metric or parameter name from `parts`, joined by ``/``, in characters trackers accept.

    >>> safe_name("silo", "hospital a@eu", "epsilon")
    'silo/hospital_a_eu/epsilon'
    >>> safe_name("silo", "..", "epsilon")
    'silo/__/epsilon'
    """
    cleaned = []
    for part in parts:
        safe = _UNSAFE.sub("_", part) or "_"
        # "." and ".." would name another path in a file-backed tracker.
        cleaned.append(safe.replace(".", "_") if set(safe) == {"."} else safe)
    return "/".join(cleaned)


def _text(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, frozenset | set | tuple | list):
        return ",".join(sorted(_text(v) for v in value))
    return str(value)  # numbers, strings and paths (a path, never its file's contents)


def _flatten(prefix: str, value: object) -> Iterator[tuple[str, str]]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _flatten(f"{prefix}{f.name}.", getattr(value, f.name))
    elif isinstance(value, Mapping):
        if not value:
            yield prefix.rstrip("."), "{}"
        for key in sorted(value):
            yield from _flatten(f"{prefix}{_UNSAFE.sub('_', str(key))}.", value[key])
    else:
        yield prefix.rstrip("."), _text(value)


def config_params(config: CoordinatorConfig) -> dict[str, str]:
    """The configuration as flat parameters, keyed by field path (``rounds.num_rounds``).

    A sub-configuration that is off (``dp``, ``secure_aggregation``) is one
    parameter, ``none``; collections are sorted and comma-joined.
    """
    params: dict[str, str] = {}
    for f in dataclasses.fields(config):
        if f.name not in _NOT_LOGGED:
            params.update(_flatten(f"{f.name}.", getattr(config, f.name)))
    return params


def round_metrics(summary: RoundSummary) -> dict[str, float]:
    """The scalars of one completed round, logged at step ``summary.round``.

    Aggregated fit and evaluation metrics (``fit/…``, ``evaluate/…``), the
    federation's silo-level figures under central or distributed DP
    (``federation/epsilon``, …), the participation counts and duration
    (``round/…``), and each silo's reported sample-level epsilon
    (``silo/<name>/epsilon``). Other per-silo metrics are not exported: the
    coordinator keeps them, but a tracker is often shared more widely.
    """
    values: dict[str, float] = {}
    for group, metrics in (
        ("fit", summary.fit_metrics),
        ("evaluate", summary.evaluation_metrics),
        ("federation", summary.federation_metrics),
    ):
        values.update({safe_name(group, k): float(v) for k, v in metrics.items()})
    for count in ("selected", "accepted", "rejected", "dropped", "declined", "bytes_received"):
        values[safe_name("round", count)] = float(getattr(summary, count))
    values["round/duration_s"] = summary.duration_s
    for silo, reported in summary.silo_metrics.items():
        epsilon = reported.get("epsilon")
        if isinstance(epsilon, int | float) and not isinstance(epsilon, bool):
            values[safe_name("silo", silo, "epsilon")] = float(epsilon)
    return values


def final_metrics(store: Store) -> tuple[int, dict[str, float]]:
    """The last committed round and its evaluation and federation figures, as ``final/…``.

    Read from the store, so that a coordinator restarted after the last round
    still records them. Returns ``(0, {})`` before any round.
    """
    committed = store.last_committed()
    if committed is None or committed.round == 0:
        return 0, {}
    values = {
        safe_name("final", source, name): value
        for round, source, name, value in store.metrics()
        if round == committed.round and source in ("evaluate", "federation")
    }
    return committed.round, values
