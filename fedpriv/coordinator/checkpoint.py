"""Checkpoint files: a magic, the model's layout, then its payload; written atomically.

A checkpoint is written to a temporary file, fsynced and renamed into place
(:mod:`fedpriv.storage`), and read back either into memory or mapped, with its
SHA-256 checked against the digest the store committed.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import pathlib
import struct
import threading
from typing import BinaryIO

import numpy as np
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from fedpriv.errors import StoreError
from fedpriv.storage import publish, write_temporary
from fedpriv.v1 import tensor_pb2
from fedpriv.wire import Model, TensorLayout, layout_from_proto

__all__ = [
    "drop_page_cache",
    "map_checkpoint",
    "read_checkpoint",
    "stage_checkpoint",
    "write_checkpoint",
]

logger = logging.getLogger(__name__)

_MAGIC = b"FPCK\x01\x00\x00\x00"
_LENGTH = struct.Struct("<Q")


def write_checkpoint(path: pathlib.Path, model: Model) -> str:
    """Write `model` atomically to `path` and return the file's SHA-256 (hex).

    The payload is written straight from the model's buffer, without a copy.
    """
    temporary, digest = stage_checkpoint(path, model)
    publish(temporary, path)
    return digest


def stage_checkpoint(path: pathlib.Path, model: Model) -> tuple[pathlib.Path, str]:
    """Write `model` to a temporary file beside `path` (not yet durable); return it and its hash."""
    header = model.layout.to_proto().SerializeToString()
    parts = [_MAGIC, _LENGTH.pack(len(header)), header, model.payload.data]
    digest = hashlib.sha256()

    def hash_parts() -> None:
        for part in parts:
            digest.update(part)  # releases the GIL: runs beside the write

    # Hashing and writing both read the payload; side by side they take the time of one.
    hasher = threading.Thread(target=hash_parts, name="fedpriv-checkpoint-hash")
    hasher.start()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = write_temporary(path, parts)
    finally:
        hasher.join()
    return temporary, digest.hexdigest()


def _read_header(handle: BinaryIO, path: pathlib.Path) -> tuple[TensorLayout, bytes]:
    """The layout of the checkpoint open in `handle` and the bytes before its payload."""
    magic = handle.read(len(_MAGIC))
    raw_length = handle.read(_LENGTH.size)
    if magic != _MAGIC or len(raw_length) != _LENGTH.size:
        raise StoreError(f"{path} is not a fedpriv checkpoint")
    (length,) = _LENGTH.unpack(raw_length)
    raw_header = handle.read(length)
    try:
        header = tensor_pb2.TensorHeader.FromString(raw_header)
    except DecodeError as err:
        raise StoreError(f"{path}: corrupt header: {err}") from err
    layout, problems = layout_from_proto(header)
    if layout is None:
        raise StoreError(f"{path}: corrupt header: {'; '.join(problems)}")
    return layout, magic + raw_length + raw_header


def _check_digest(path: pathlib.Path, digest: str, sha256: str | None) -> None:
    if sha256 is not None and digest != sha256:
        raise StoreError(f"{path}: SHA-256 differs from the committed round; file corrupt")


def read_checkpoint(path: pathlib.Path, *, sha256: str | None = None) -> Model:
    """Read a checkpoint written by :func:`write_checkpoint` into memory.

    Raises:
        StoreError: The file is missing, truncated, corrupt or its hash differs.
    """
    try:
        with open(path, "rb") as handle:
            layout, prefix = _read_header(handle, path)
            payload = np.empty(layout.payload_bytes, dtype=np.uint8)
            if handle.readinto(payload.data) != layout.payload_bytes or handle.read(1):
                raise StoreError(f"{path}: payload length differs from its header")
    except OSError as err:
        raise StoreError(f"cannot read checkpoint {path}: {err.strerror}") from err
    if sha256 is not None:
        digest = hashlib.sha256(prefix)
        digest.update(payload.data)
        _check_digest(path, digest.hexdigest(), sha256)
    return Model(layout=layout, payload=payload)


def map_checkpoint(path: pathlib.Path, *, sha256: str | None = None) -> Model:
    """Map a checkpoint's payload read-only, without reading it into memory.

    The coordinator serves the global model this way: its pages live in the
    kernel's page cache, which the process shares and the kernel may reclaim,
    and the server maps in only the chunks it is sending (see
    :meth:`Model.evict`). The file must not be modified while mapped;
    checkpoints are written once, to a temporary name, and renamed into place.

    Raises:
        StoreError: The file is missing, truncated, corrupt or its hash differs.
    """
    try:
        with open(path, "rb") as handle:
            layout, prefix = _read_header(handle, path)
            size = os.fstat(handle.fileno()).st_size
            if size != len(prefix) + layout.payload_bytes:
                raise StoreError(f"{path}: payload length differs from its header")
            if sha256 is not None:
                handle.seek(0)
                # Reads through a small buffer: the file is hashed, not loaded.
                _check_digest(path, hashlib.file_digest(handle, "sha256").hexdigest(), sha256)
            mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as err:
        raise StoreError(f"cannot read checkpoint {path}: {err.strerror}") from err
    # The array keeps the mapping open; it is unmapped when the last view goes.
    payload = np.frombuffer(mapping, np.uint8, count=layout.payload_bytes, offset=len(prefix))
    return Model(layout=layout, payload=payload)


def drop_page_cache(path: pathlib.Path) -> None:
    """Ask the kernel to drop `path`'s clean cached pages (a hint; a missing file is fine).

    Called on the superseded checkpoint just before the next one is written, so
    that the new checkpoint's pages are the ones just freed. On the reference
    machine (a VM), writing 200 MB into freshly allocated page-cache pages took
    0.59 s, into pages freed a moment before 0.05 s (docs/performance.md). Pages
    that a download in flight still maps are left alone by the kernel; anything
    read later comes back from the (durable) file.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:  # not every file system takes the hint
        pass
    finally:
        os.close(fd)
