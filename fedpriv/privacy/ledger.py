"""A silo's privacy ledger: every release it made, on its own disk, surviving crashes.

Each entry is one training run whose update may have left the silo: the
mechanism's (noise multiplier, sample rate, steps) and its clipping norm. The
file is rewritten atomically (temp file, fsync, rename) on every record, and
the runtime records an entry *before* the first byte of the update is sent, so
a crash can over-count a spend but never hide one.

Three files sit side by side (``ledger.json`` stands for the configured path):

- ``ledger.json``: the history, with the delta every epsilon is computed at and
  the ledger's random id. Opening it at another delta is refused: epsilon at a
  larger delta is smaller, so re-reading the same history that way would allow
  more rounds.
- ``ledger.json.lock``: an OS lock (``flock``), held by the one process that has
  the ledger open, with that process's pid inside. A second process (or a second
  open in the same process) is refused, so two processes can never both pass
  the budget check before either records. The kernel drops the lock when its
  holder dies, however it dies: there is no stale lock to clear by hand.
- ``ledger.json.marker``: the ledger's id and how many runs it held, rewritten
  after every record. A ledger that is missing while its marker exists, that
  holds fewer runs than the marker, or whose id differs, was deleted, rolled
  back or swapped; it is refused unless the operator resets it knowingly
  (``fedpriv client --reset-ledger``). Deleting the whole folder removes the
  marker too; the coordinator then still refuses the silo, because its reported
  epsilon went down.

With an encryption key (``[privacy] encryption_key_file`` or ``encryption_key_env``)
the ledger and its marker are encrypted at rest (:mod:`fedpriv.atrest`): they
can be neither read nor altered without the key, and a plain file in their
place is refused. The lock file holds only a pid and stays plain.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import pathlib
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

from fedpriv.atrest import AtRestKey, Purpose, read_file, refuse_sealed, write_file
from fedpriv.errors import ConfigError, PrivacyBudgetExceeded, StoreError
from fedpriv.privacy.accounting import DEFAULT_DELTA, GaussianSteps, epsilon, epsilon_rdp
from fedpriv.storage import write_atomic

__all__ = ["LedgerEntry", "PrivacyBudget", "PrivacyLedger"]

logger = logging.getLogger(__name__)

_FORMAT = 1
_RESET_HINT = (
    "restore the ledger from a backup; or, to start the silo's accounting from zero "
    "knowingly, run `fedpriv client --reset-ledger` (a coordinator that saw this silo's "
    "earlier epsilon will refuse its updates, since its spend cannot go down)"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyBudget:
    """The most a silo will spend: epsilon at delta, over the ledger's whole history.

    Args:
        epsilon: Largest total epsilon the silo accepts.
        delta: Delta every epsilon is computed at; keep it below 1/N for N records.
    """

    epsilon: float
    delta: float = DEFAULT_DELTA

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


def _sidecar(path: pathlib.Path, suffix: str) -> pathlib.Path:
    return path.with_name(path.name + suffix)


def _lock(path: pathlib.Path) -> int:
    """Take the ledger's exclusive lock; return the lock file's descriptor.

    Raises:
        StoreError: Another process (or another open ledger in this one) holds it.
    """
    lock_path = _sidecar(path, ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise StoreError(f"cannot open the privacy ledger's lock {lock_path}: {err}") from err
    try:
        # flock, not lockf: its lock belongs to this open file, so a second open in
        # the same process is refused too. The lock file is never replaced (a
        # rename would leave the lock on a file nobody else opens).
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise StoreError(f"cannot lock the privacy ledger {path}: {err}") from err
        raise StoreError(
            f"privacy ledger {path} is in use by another process (pid {holder}, lock "
            f"{lock_path}); two processes on one ledger could both pass the budget check "
            "and spend it twice, so this one refuses to start. Stop the other silo "
            "process first: one dataset has one ledger, used by one process at a time"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_json(
    path: pathlib.Path, what: str, *, key: AtRestKey | None, purpose: Purpose
) -> dict[str, Any] | None:
    """The JSON document at `path` (decrypted with `key`), or None if there is no file.

    Raises:
        StoreError: It exists but cannot be read or parsed.
        IntegrityError: With `key`: it is plain, under another key, or modified.
        ConfigError: Without `key`: it is encrypted.
    """
    try:
        if key is None:
            raw = path.read_bytes()
            refuse_sealed(path, raw)
        else:
            raw = read_file(path, key=key, purpose=purpose)
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("format") != _FORMAT:
            raise ValueError(f"unknown format {data.get('format')!r}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise StoreError(f"cannot read {what} {path}: {err}; refusing to train without it") from err
    return data


def _marker_problems(
    marker: dict[str, Any] | None, *, ledger_id: str | None, entries: int
) -> list[str]:
    """How the ledger differs from what its marker recorded (nothing when there is no marker)."""
    if marker is None:
        return []
    problems = []
    if ledger_id is not None and marker.get("ledger_id") != ledger_id:
        problems.append(
            f"it is another ledger (id {ledger_id}; the marker names {marker.get('ledger_id')})"
        )
    recorded = marker.get("entries")
    if isinstance(recorded, int) and entries < recorded:
        problems.append(
            f"it holds {entries} runs, the marker recorded {recorded}: an older copy was restored"
        )
    return problems


def _warn_reset(what: str) -> None:
    logger.warning(
        "!!! --reset-ledger: %s. Accounting restarts from the ledger as it is now; the "
        "privacy spent before is no longer counted by this silo. A coordinator that saw "
        "the silo's earlier epsilon refuses its updates. !!!",
        what,
    )


class PrivacyLedger:
    """The persisted history of one silo's privacy spending, with its budget.

    Open it with :meth:`open` and close it (or use it as a context manager): while
    it is open, no other process can open the same ledger.

    Example:
        >>> import tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "ledger.json"
        >>> run = GaussianSteps(noise_multiplier=1.0, sample_rate=0.01, steps=500)
        >>> with PrivacyLedger.open(path, budget=PrivacyBudget(epsilon=3.0)) as ledger:
        ...     _ = ledger.record(run, round=1, max_grad_norm=1.0)
        >>> with PrivacyLedger.open(path, budget=ledger.budget) as again:
        ...     round(again.spent_epsilon(), 3), round(again.spent_epsilon_rdp(), 3)
        (1.331, 1.653)
    """

    def __init__(
        self,
        path: pathlib.Path,
        *,
        budget: PrivacyBudget,
        entries: Sequence[LedgerEntry],
        ledger_id: str,
        lock_fd: int,
        key: AtRestKey | None = None,
    ) -> None:
        self.path = path
        self.budget = budget
        self.ledger_id = ledger_id
        self._key = key
        self._entries = list(entries)
        self._lock = threading.Lock()
        # Closes the lock file (releasing the lock) on close(), or when the ledger is
        # collected or the interpreter exits; runs at most once.
        self._release = weakref.finalize(self, os.close, lock_fd)

    @classmethod
    def open(
        cls,
        path: pathlib.Path,
        *,
        budget: PrivacyBudget,
        reset: bool = False,
        key: AtRestKey | None = None,
    ) -> PrivacyLedger:
        """Lock and load the ledger at `path`, or start an empty one there.

        Args:
            path: The ledger file.
            budget: The silo's budget; its delta must be the one the ledger was
                recorded at.
            reset: Accept a ledger that is missing, rolled back or swapped although
                its marker shows another existed, and start accounting from what is
                there (nothing, for a missing one). Logs a warning.
            key: Encrypt the ledger and its marker at rest under this key; None
                keeps them plain. Either way a file in the other form is refused.

        Raises:
            StoreError: Another process has the ledger open; the file cannot be read;
                or it is missing, older than its marker or another ledger, and
                `reset` is not set. The silo must not train on it.
            IntegrityError: With `key`: the ledger or its marker is plain, was
                encrypted under another key, or was modified.
            ConfigError: The ledger was recorded at another delta than `budget`'s, or
                it is encrypted and no `key` is given.
        """
        path = pathlib.Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(
                f"cannot create the privacy ledger's folder {path.parent}: {err}"
            ) from err
        fd = _lock(path)
        try:
            return cls._load(path, budget=budget, reset=reset, lock_fd=fd, key=key)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _load(
        cls,
        path: pathlib.Path,
        *,
        budget: PrivacyBudget,
        reset: bool,
        lock_fd: int,
        key: AtRestKey | None,
    ) -> PrivacyLedger:
        """Read the ledger and its marker (the caller holds the lock)."""
        marker_path = _sidecar(path, ".marker")
        marker = _read_json(
            marker_path, "privacy ledger marker", key=key, purpose=Purpose.LEDGER_MARKER
        )
        data = _read_json(path, "privacy ledger", key=key, purpose=Purpose.LEDGER)
        if data is None:
            if marker is not None:
                existed = (
                    f"privacy ledger {path} is missing, but {marker_path} shows that one "
                    f"existed (id {marker.get('ledger_id')}, {marker.get('entries')} runs "
                    "recorded); deleting a ledger does not undo the privacy it recorded"
                )
                if not reset:
                    raise StoreError(f"{existed}: {_RESET_HINT}")
                _warn_reset(existed)
            ledger = cls(
                path,
                budget=budget,
                entries=[],
                ledger_id=uuid.uuid4().hex,
                lock_fd=lock_fd,
                key=key,
            )
            ledger._save()
            ledger._mark()
            return ledger
        try:
            entries = [LedgerEntry(**item) for item in data["entries"]]
            recorded_delta = float(data["delta"])
            ledger_id = data.get("ledger_id")
        except (KeyError, TypeError, ValueError) as err:
            raise StoreError(
                f"cannot read privacy ledger {path}: {err}; refusing to train without it"
            ) from err
        if recorded_delta != budget.delta:
            raise ConfigError(
                f"privacy ledger {path} was recorded at delta = {recorded_delta:g}, but "
                f"[privacy] delta = {budget.delta:g}: every epsilon of one ledger is computed "
                "at one delta, and the same history read at a larger delta shows a smaller "
                "epsilon (and would allow more rounds). Set [privacy] delta = "
                f"{recorded_delta:g} again; to change delta, move this ledger away and start "
                "a new one with `fedpriv client --reset-ledger`"
            )
        problems = _marker_problems(marker, ledger_id=ledger_id, entries=len(entries))
        if problems:
            swapped = f"privacy ledger {path} does not match {marker_path}: " + "; ".join(problems)
            if not reset:
                raise StoreError(f"{swapped}: {_RESET_HINT}")
            _warn_reset(swapped)
        elif reset:
            logger.warning(
                "--reset-ledger: privacy ledger %s is intact; it is kept with its %d runs "
                "(to start over, move it away first)",
                path,
                len(entries),
            )
        ledger = cls(
            path,
            budget=budget,
            entries=entries,
            ledger_id=ledger_id or uuid.uuid4().hex,
            lock_fd=lock_fd,
            key=key,
        )
        if ledger_id is None:  # written before ledgers had ids
            ledger._save()
        ledger._mark()
        return ledger

    def close(self) -> None:
        """Release the lock; the ledger can then be opened again (by any process)."""
        with self._lock:
            self._release()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return not self._release.alive

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

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
            StoreError: The ledger was closed.
        """
        if self.closed:
            raise StoreError(f"privacy ledger {self.path} is closed; open it again to train")
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
        """Append a run, write the ledger durably, and return the new spent epsilon.

        The budget is checked again under the ledger's lock, so two threads that
        both passed :meth:`check` cannot both record.

        Raises:
            PrivacyBudgetExceeded: Recording `planned` would overspend; nothing is
                recorded and the update must not be sent.
            StoreError: The ledger is closed or could not be written.
        """
        entry = LedgerEntry(
            round=round,
            noise_multiplier=planned.noise_multiplier,
            sample_rate=planned.sample_rate,
            steps=planned.steps,
            max_grad_norm=max_grad_norm,
            recorded_unix_s=time.time(),
        )
        with self._lock:
            self.check(planned)
            self._entries.append(entry)
            try:
                self._save()
            except OSError as err:
                self._entries.pop()  # the file still holds the old history
                raise StoreError(f"cannot write privacy ledger {self.path}: {err}") from err
            self._mark()
        spent = self.spent_epsilon()
        logger.info(
            "privacy spend recorded round=%d epsilon=%.4f delta=%g", round, spent, self.budget.delta
        )
        return spent

    def _mark(self) -> None:
        """Write the marker: this ledger exists, with this id and this many runs."""
        marker = {
            "format": _FORMAT,
            "ledger_id": self.ledger_id,
            "entries": len(self._entries),
            "note": "written by fedpriv beside its privacy ledger; do not delete",
        }
        try:
            self._write(_sidecar(self.path, ".marker"), json.dumps(marker), Purpose.LEDGER_MARKER)
        except OSError as err:
            # The ledger itself is durable; a stale marker only under-counts runs.
            logger.warning("cannot write privacy ledger marker beside %s: %s", self.path, err)

    def _save(self) -> None:
        document = {
            "format": _FORMAT,
            "ledger_id": self.ledger_id,
            "delta": self.budget.delta,
            "entries": [asdict(e) for e in self._entries],
        }
        self._write(self.path, json.dumps(document, indent=1), Purpose.LEDGER)

    def _write(self, path: pathlib.Path, text: str, purpose: Purpose) -> None:
        """Write `text` atomically to `path`, encrypted when the ledger has a key."""
        if self._key is None:
            write_atomic(path, text.encode(), mode=0o600)
        else:
            write_file(path, text.encode(), key=self._key, purpose=purpose, mode=0o600)

    def spent_epsilon_rdp(self) -> float:
        """The Rényi DP bound of the same history, shown beside the tight `spent_epsilon`."""
        return epsilon_rdp([e.mechanism for e in self._entries], delta=self.budget.delta)
