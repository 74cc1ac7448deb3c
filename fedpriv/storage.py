"""Crash-safe file writes shared by the coordinator store, the PKI and silo state."""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Iterable

__all__ = ["publish", "write_atomic", "write_atomic_parts", "write_temporary"]


def write_atomic(path: pathlib.Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    write_atomic_parts(path, [data], mode=mode)


def write_atomic_parts(
    path: pathlib.Path, parts: Iterable[bytes | memoryview], *, mode: int = 0o644
) -> None:
    """Write `parts` in order to a temporary file, fsync it, rename it over `path`, fsync the dir.

    A crash at any point leaves either the previous file or the complete new one.
    """
    publish(write_temporary(path, parts, mode=mode), path)


def write_temporary(
    path: pathlib.Path, parts: Iterable[bytes | memoryview], *, mode: int = 0o644
) -> pathlib.Path:
    """Write `parts` to a new hidden temporary file beside `path`; return its path.

    Nothing is durable yet: :func:`publish` makes it so. The temporary file is
    removed if writing fails.
    """
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            for part in parts:
                handle.write(part)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return pathlib.Path(tmp)


def publish(temporary: pathlib.Path, path: pathlib.Path) -> None:
    """Fsync `temporary`, rename it over `path` and fsync the folder (the file is then durable).

    On failure the temporary file is removed and `path` is unchanged.
    """
    try:
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
