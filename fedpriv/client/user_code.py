"""Calls into the silo's own model code: an exception there fails one task, not the silo.

A ``fit`` or ``evaluate`` that raises (a bug, a bad batch, an out-of-memory
error) is reported to the coordinator as the task's declined reason and logged
here with its full traceback; the silo then takes the next task. The reason is
the traceback's last line (``ValueError: ...``), as an operator would want to
read it in ``fedpriv status``.

Under differential privacy nothing un-noised leaves the silo, and an exception
message can quote data (``bad value 37.2 in row 'patient-118'``). A private
silo therefore reports only the exception's type, and the message stays in its
own log.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import TypeVar

__all__ = ["UserCodeFailed", "call_user_code", "failure_reason"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class UserCodeFailed(Exception):
    """The silo's ``fit`` or ``evaluate`` raised; :attr:`reason` is what the coordinator gets."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def failure_reason(what: str, error: BaseException, *, private: bool) -> str:
    """The one line the coordinator records for `error`, raised by the silo's `what`.

    >>> failure_reason("fit", ValueError("bad row 7"), private=False)
    'fit raised ValueError: bad row 7'
    >>> failure_reason("fit", ValueError("bad row 7"), private=True).split(" (")[0]
    'fit raised ValueError'
    """
    if private:
        return (
            f"{what} raised {type(error).__name__} (message withheld: this silo trains with "
            "differential privacy; see its log)"
        )
    last = traceback.format_exception_only(type(error), error)[-1].strip()
    return f"{what} raised {last}"


def call_user_code(what: str, fn: Callable[[], T], *, private: bool) -> T:
    """Run `fn` (the silo's ``fit`` or ``evaluate``); its exception becomes UserCodeFailed.

    Raises:
        UserCodeFailed: `fn` raised an :class:`Exception` (not KeyboardInterrupt or
            SystemExit, which still stop the silo).
    """
    try:
        return fn()
    except Exception as error:
        logger.exception("the silo's %s raised; the task is declined", what)
        raise UserCodeFailed(failure_reason(what, error, private=private)) from error
