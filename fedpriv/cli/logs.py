"""Where the command line's log records go while one command runs."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

__all__ = ["logging_to_stderr"]


@contextlib.contextmanager
def logging_to_stderr(level: int) -> Iterator[None]:
    """Root logging to the current stderr while a command runs, then as it was.

    Some libraries (opacus) install a root handler when imported; ours replaces it
    for the command. Restoring afterwards keeps ``main()`` safe to call in-process:
    a handler bound to this call's stderr must not outlive it.
    """
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for old in saved_handlers:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        for old in saved_handlers:
            root.addHandler(old)
        root.setLevel(saved_level)
