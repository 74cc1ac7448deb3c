"""Named fault-injection points, for crash tests that kill a process at an exact place.

A test arms one point; the code calls :func:`reach` at each point, and the armed
point acts on its n-th hit. With nothing armed (always, outside tests)
:func:`reach` returns at once: one comparison against ``None``. Nothing is read
from the environment at import time: the ``fedpriv`` command arms the point named
by ``FEDPRIV_FAULT`` when it starts (:func:`arm_from_environment`), and a test
that runs a coordinator in its own process may call :func:`arm`.

``FEDPRIV_FAULT=POINT[@HIT][,ACTION]``, for example
``FEDPRIV_FAULT=after-checkpoint-before-sql@2,kill``:

- ``POINT``: one of :class:`FaultPoint`'s values.
- ``HIT``: act on the n-th time the point is reached in this process (default 1).
- ``ACTION``: ``kill`` (default) sends the process SIGKILL, as a power cut or the
  OOM killer would, with no cleanup; ``exit`` ends it with
  :data:`FAULT_EXIT_CODE` and no cleanup either (``os._exit``); ``hold`` blocks
  the thread at the point until the FIFO named by ``FEDPRIV_FAULT_FIFO`` is
  opened for writing and closed (the test then kills the process, or lets it go on).

Before it acts, the point writes one line to stderr, ``fedpriv fault point=NAME
hit=N action=ACTION pid=PID``, and flushes it: a test waits for that line instead
of a timing window, and knows where the process stopped.
"""

from __future__ import annotations

import enum
import os
import pathlib
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from fedpriv.errors import ConfigError

__all__ = [
    "FAULT_EXIT_CODE",
    "FaultAction",
    "FaultPoint",
    "FaultSpec",
    "arm",
    "arm_from_environment",
    "disarm",
    "reach",
]

FAULT_EXIT_CODE = 86
"""The exit status of a process ended by an ``exit`` fault (distinct from 1 and 2)."""

ENVIRONMENT_VARIABLE = "FEDPRIV_FAULT"
FIFO_VARIABLE = "FEDPRIV_FAULT_FIFO"


class FaultPoint(enum.Enum):
    """The places where a crash test can stop a process."""

    AFTER_FOLD_BEFORE_COMMIT = "after-fold-before-commit"
    """Coordinator: a round's uploads are folded and its model is final; nothing is written."""
    AFTER_CHECKPOINT_BEFORE_SQL = "after-checkpoint-before-sql"
    """Coordinator: the round's checkpoint is durable under its final name; its SQLite
    transaction (round, metrics, spends, attempt) has not run."""
    DURING_UPLOAD = "during-upload"
    """Coordinator: a chunk of a silo's upload was folded (each chunk is one hit)."""
    AFTER_LEDGER_RECORD_BEFORE_UPLOAD = "after-ledger-record-before-upload"
    """Silo: the training run's spend is in the privacy ledger, on disk; no byte of the
    update has been sent."""
    AFTER_MASKED_UPLOAD_BEFORE_UNMASK = "after-masked-upload-before-unmask"
    """Silo, under secure aggregation: the coordinator accepted the masked update; the
    silo has revealed no share for the unmasking."""


class FaultAction(enum.Enum):
    """What an armed point does when it is hit."""

    KILL = "kill"
    EXIT = "exit"
    HOLD = "hold"


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultSpec:
    """One armed point.

    Args:
        point: Where to act.
        hit: Act on this hit of the point (1 = the first time it is reached).
        action: What to do there.
        fifo: For ``HOLD``: the FIFO whose opening for writing releases the thread.
    """

    point: FaultPoint
    hit: int = 1
    action: FaultAction = FaultAction.KILL
    fifo: pathlib.Path | None = None

    def __post_init__(self) -> None:
        if self.hit < 1:
            raise ConfigError(f"{ENVIRONMENT_VARIABLE}: hit {self.hit} must be >= 1")
        if self.action is FaultAction.HOLD and self.fifo is None:
            raise ConfigError(
                f"{ENVIRONMENT_VARIABLE}: the hold action needs {FIFO_VARIABLE}, a FIFO "
                "the test opens for writing to release the held thread"
            )

    @classmethod
    def parse(cls, text: str, *, fifo: str | None = None) -> FaultSpec:
        """Read ``POINT[@HIT][,ACTION]``.

        Raises:
            ConfigError: An unknown point or action, or a hit that is not a positive integer.
        """
        where, _, action_name = text.strip().partition(",")
        name, _, hit_text = where.partition("@")
        try:
            point = FaultPoint(name.strip())
        except ValueError:
            known = ", ".join(p.value for p in FaultPoint)
            raise ConfigError(
                f"{ENVIRONMENT_VARIABLE}={text!r}: unknown point {name!r}; known: {known}"
            ) from None
        try:
            action = FaultAction(action_name.strip() or FaultAction.KILL.value)
        except ValueError:
            known = ", ".join(a.value for a in FaultAction)
            raise ConfigError(
                f"{ENVIRONMENT_VARIABLE}={text!r}: unknown action {action_name!r}; known: {known}"
            ) from None
        hit = 1
        if hit_text:
            if not hit_text.strip().isdigit():
                raise ConfigError(
                    f"{ENVIRONMENT_VARIABLE}={text!r}: hit {hit_text!r} must be a positive integer"
                )
            hit = int(hit_text)
        return cls(point=point, hit=hit, action=action, fifo=pathlib.Path(fifo) if fifo else None)


class _Armed:
    """The armed point and how often it was reached (points are hit from many threads)."""

    def __init__(self, spec: FaultSpec) -> None:
        self.spec = spec
        self.hits = 0
        self.lock = threading.Lock()


_armed: _Armed | None = None


def arm(spec: FaultSpec) -> None:
    """Arm `spec` in this process (replacing any armed point)."""
    global _armed
    _armed = _Armed(spec)


def disarm() -> None:
    """Disarm the armed point, if any."""
    global _armed
    _armed = None


def arm_from_environment(environ: Mapping[str, str] | None = None) -> FaultSpec | None:
    """Arm the point that ``FEDPRIV_FAULT`` names; None (and nothing armed) when it is unset.

    Raises:
        ConfigError: The variable is set but malformed.
    """
    environ = os.environ if environ is None else environ
    text = environ.get(ENVIRONMENT_VARIABLE, "")
    if not text.strip():
        return None
    spec = FaultSpec.parse(text, fifo=environ.get(FIFO_VARIABLE))
    arm(spec)
    return spec


def reach(point: FaultPoint) -> None:
    """Mark that the code is at `point`; act there if it is armed and this is its hit."""
    armed = _armed
    if armed is None or armed.spec.point is not point:
        return
    with armed.lock:
        armed.hits += 1
        if armed.hits != armed.spec.hit:
            return
    spec = armed.spec
    sys.stderr.write(
        f"fedpriv fault point={point.value} hit={spec.hit} action={spec.action.value} "
        f"pid={os.getpid()}\n"
    )
    sys.stderr.flush()
    if spec.action is FaultAction.KILL:
        os.kill(os.getpid(), signal.SIGKILL)
    elif spec.action is FaultAction.EXIT:
        os._exit(FAULT_EXIT_CODE)
    elif spec.fifo is not None:  # FaultSpec requires a FIFO for HOLD
        # Opening a FIFO for reading blocks until a writer opens it; reading then
        # returns once that writer closes it.
        with open(spec.fifo, "rb") as released:
            released.read()
