"""Crash-safe file writes shared by the coordinator store, the PKI and silo state."""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Iterable

__all__ = ["write_atomic", "write_atomic_parts"]


def write_atomic(path: pathlib.Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    write_atomic_parts(path, [data], mode=mode)


def write_atomic_parts(
    path: pathlib.Path, parts: Iterable[bytes | memoryview], *, mode: int = 0o644
) -> None:
    """Write `parts` in order to a temporary file, fsync it, rename it over `path`, fsync the dir.

    A crash at any point leaves either the previous file or the complete new one.
    """
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            for part in parts:
                handle.write(part)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
