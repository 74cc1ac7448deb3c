"""Training progress in a silo: rich bars on a terminal, one log line per epoch otherwise.

The mode is process-wide: ``fedpriv client --quiet`` sets it to ``OFF``; a
silo embedding the SDK may call :func:`set_mode` itself.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["EpochProgress", "ProgressMode", "set_mode", "training_progress"]

logger = logging.getLogger("fedpriv.client.training")


class ProgressMode(enum.Enum):
    """How training progress is shown."""

    AUTO = "auto"  # bars when stderr is a terminal, log lines otherwise
    BARS = "bars"
    LINES = "lines"
    OFF = "off"


_mode = ProgressMode.AUTO


def set_mode(mode: ProgressMode) -> None:
    """Choose how every later ``fit`` shows its progress."""
    global _mode
    _mode = mode


class EpochProgress:
    """Progress of one ``fit`` call: a bar per epoch, advanced per batch."""

    def __init__(
        self, *, epochs: int, batches: int | None, label: str, bars: bool, silent: bool = False
    ) -> None:
        self._silent = silent
        self._epochs = epochs
        self._batches = batches
        self._label = label
        self._started = time.monotonic()
        self._epoch_started = self._started
        self._epoch = 0
        self._last_loss = float("nan")
        self._task: Any = None
        self._progress: Any = None
        if bars and not silent:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            self._progress = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(file=sys.stderr),
                transient=True,
            )
            self._progress.start()
        self._next_epoch()

    def _next_epoch(self) -> None:
        self._epoch += 1
        self._epoch_started = time.monotonic()
        if self._progress is not None and self._epoch <= self._epochs:
            self._task = self._progress.add_task(
                f"{self._label} epoch {self._epoch}/{self._epochs}", total=self._batches
            )

    def batch(self) -> None:
        """One batch was trained on."""
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task)

    def epoch_done(self, mean_loss: float) -> None:
        """The current epoch ended with this mean training loss."""
        now = time.monotonic()
        self._last_loss = mean_loss
        if self._progress is not None:
            if self._task is not None:
                self._progress.update(
                    self._task,
                    description=f"{self._label} epoch {self._epoch}/{self._epochs} "
                    f"loss {mean_loss:.4f}",
                )
        elif not self._silent:
            logger.info(
                "%s epoch %d/%d loss %.4f (%.2f s)",
                self._label,
                self._epoch,
                self._epochs,
                mean_loss,
                now - self._epoch_started,
            )
        self._next_epoch()

    def close(self) -> None:
        """Remove the bars (a finished round leaves its log line, not its bars)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            logger.info(
                "%s: %d epochs, last loss %.4f (%.1f s)",
                self._label,
                self._epoch - 1,
                self._last_loss,
                time.monotonic() - self._started,
            )


@contextlib.contextmanager
def training_progress(*, epochs: int, batches: int | None, label: str) -> Iterator[EpochProgress]:
    """Show the progress of one ``fit`` call as the process-wide mode says."""
    mode = _mode
    if mode is ProgressMode.AUTO:
        mode = ProgressMode.BARS if sys.stderr.isatty() else ProgressMode.LINES
    silent = mode is ProgressMode.OFF or (
        mode is ProgressMode.LINES and not logger.isEnabledFor(logging.INFO)
    )
    progress = EpochProgress(
        epochs=epochs, batches=batches, label=label, bars=mode is ProgressMode.BARS, silent=silent
    )
    try:
        yield progress
    finally:
        progress.close()
