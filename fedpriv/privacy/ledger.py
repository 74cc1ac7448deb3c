"""A silo's privacy ledger: every release it made, on its own disk, surviving crashes.

Each entry is one training run whose update may have left the silo: the
mechanism's (noise multiplier, sample rate, steps) and its clipping norm. The
file is rewritten atomically (temp file, fsync, rename) on every record, and
the runtime records an entry *before* the first byte of the update is sent, so
a crash can over-count a spend but never hide one.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from fedpriv.errors import ConfigError, PrivacyBudgetExceeded, StoreError
from fedpriv.privacy.accounting import GaussianSteps, epsilon, epsilon_rdp
from fedpriv.storage import write_atomic

__all__ = ["LedgerEntry", "PrivacyBudget", "PrivacyLedger"]

logger = logging.getLogger(__name__)

_FORMAT = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyBudget:
    """The most a silo will spend: epsilon at delta, over the ledger's whole history.

    Args:
        epsilon: Largest total epsilon the silo accepts.
        delta: Delta every epsilon is computed at; keep it below 1/N for N records.
    """

    epsilon: float
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not self.epsilon > 0 or not math.isfinite(self.epsilon):
            raise ConfigError(f"privacy.epsilon = {self.epsilon}: must be a finite number > 0")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta = {self.delta}: must be in (0, 1)")


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerEntry:
    """One recorded training run."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    recorded_unix_s: float

    @property
    def mechanism(self) -> GaussianSteps:
        """The run as an accountant input."""
        return GaussianSteps(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=self.steps
        )


class PrivacyLedger:
    """The persisted history of one silo's privacy spending, with its budget.

    Example:
        >>> import tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "ledger.json"
        >>> ledger = PrivacyLedger.open(path, budget=PrivacyBudget(epsilon=3.0))
        >>> run = GaussianSteps(noise_multiplier=1.0, sample_rate=0.01, steps=500)
        >>> _ = ledger.record(run, round=1, max_grad_norm=1.0)
        >>> reopened = PrivacyLedger.open(path, budget=ledger.budget)
        >>> round(reopened.spent_epsilon(), 3), round(reopened.spent_epsilon_rdp(), 3)
        (1.331, 1.653)
    """

    def __init__(
        self, path: pathlib.Path, *, budget: PrivacyBudget, entries: Sequence[LedgerEntry]
    ) -> None:
        self.path = path
        self.budget = budget
        self._entries = list(entries)
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: pathlib.Path, *, budget: PrivacyBudget) -> PrivacyLedger:
        """Load the ledger at `path`, or start an empty one there.

        Raises:
            StoreError: The file exists but cannot be read or parsed; the silo must
                not train on a ledger it cannot read.
        """
        path = pathlib.Path(path)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            ledger = cls(path, budget=budget, entries=[])
            ledger._save()
            return ledger
        try:
            data = json.loads(path.read_text())
            if data.get("format") != _FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            entries = [LedgerEntry(**item) for item in data["entries"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StoreError(
                f"cannot read privacy ledger {path}: {err}; refusing to train without it"
            ) from err
        return cls(path, budget=budget, entries=entries)

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        """Recorded runs, oldest first."""
        return tuple(self._entries)

    def spent_epsilon(self) -> float:
        """Epsilon at the budget's delta over the whole history."""
        return epsilon([e.mechanism for e in self._entries], delta=self.budget.delta)

    def projected_epsilon(self, planned: GaussianSteps) -> float:
        """Epsilon if `planned` were recorded too."""
        return epsilon([*(e.mechanism for e in self._entries), planned], delta=self.budget.delta)

    def check(self, planned: GaussianSteps) -> float:
        """Return the projected epsilon, or raise if it would exceed the budget.

        Raises:
            PrivacyBudgetExceeded: Training `planned` would overspend.
        """
        projected = self.projected_epsilon(planned)
        if projected > self.budget.epsilon:
            raise PrivacyBudgetExceeded(
                spent_epsilon=self.spent_epsilon(),
                projected_epsilon=projected,
                budget_epsilon=self.budget.epsilon,
                delta=self.budget.delta,
            )
        return projected

    def record(self, planned: GaussianSteps, *, round: int, max_grad_norm: float) -> float:
        """Append a run, write the ledger durably, and return the new spent epsilon."""
        entry = LedgerEntry(
            round=round,
            noise_multiplier=planned.noise_multiplier,
            sample_rate=planned.sample_rate,
            steps=planned.steps,
            max_grad_norm=max_grad_norm,
            recorded_unix_s=time.time(),
        )
        with self._lock:
            self._entries.append(entry)
            self._save()
        spent = self.spent_epsilon()
        logger.info(
            "privacy spend recorded round=%d epsilon=%.4f delta=%g", round, spent, self.budget.delta
        )
        return spent

    def _save(self) -> None:
        document = {
            "format": _FORMAT,
            "delta": self.budget.delta,
            "entries": [asdict(e) for e in self._entries],
        }
        write_atomic(self.path, json.dumps(document, indent=1).encode(), mode=0o600)

    def spent_epsilon_rdp(self) -> float:
        """The Rényi DP bound of the same history, shown beside the tight `spent_epsilon`."""
        return epsilon_rdp([e.mechanism for e in self._entries], delta=self.budget.delta)
