"""Checkpoint files: a magic, the model's layout, then its payload; written atomically.

A checkpoint is written to a temporary file, fsynced and renamed into place
(:mod:`fedpriv.storage`), and read back either into memory or mapped, with its
SHA-256 checked against the digest the store committed.

With an encryption key (``[store] encryption_key_file`` or ``encryption_key_env``)
the same bytes are sealed in chunks by :mod:`fedpriv.atrest` as they are
written, and opened chunk by chunk as they are read. The SHA-256 is always that
of the plain checkpoint bytes, so a round's committed digest does not depend on
whether its file is encrypted.
"""

from __future__ import annotations

import hashlib
import io
import logging
import mmap
import os
import pathlib
import struct
import threading
from typing import BinaryIO

import numpy as np
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from fedpriv.atrest import AtRestKey, Purpose, SealedReader, refuse_sealed, seal
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


def write_checkpoint(path: pathlib.Path, model: Model, *, key: AtRestKey | None = None) -> str:
    """Write `model` atomically to `path` and return its plain bytes' SHA-256 (hex).

    The payload is written straight from the model's buffer, without a copy;
    with `key`, it is encrypted a chunk at a time on the way.
    """
    temporary, digest = stage_checkpoint(path, model, key=key)
    publish(temporary, path)
    return digest


def stage_checkpoint(
    path: pathlib.Path, model: Model, *, key: AtRestKey | None = None
) -> tuple[pathlib.Path, str]:
    """Write `model` to a temporary file beside `path` (not yet durable); return it and its hash.

    Args:
        path: Where the checkpoint will be published.
        model: The model to write.
        key: Encrypt the file under this key (:mod:`fedpriv.atrest`); None writes it plain.
    """
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
        written = parts if key is None else seal(parts, key=key, purpose=Purpose.CHECKPOINT)
        temporary = write_temporary(path, written)
    finally:
        hasher.join()
    return temporary, digest.hexdigest()


def _read_header(handle: BinaryIO | SealedReader, path: pathlib.Path) -> tuple[TensorLayout, bytes]:
    """The layout of the checkpoint open in `handle` and the bytes before its payload."""
    magic = handle.read(len(_MAGIC))
    raw_length = handle.read(_LENGTH.size)
    if magic != _MAGIC or len(raw_length) != _LENGTH.size:
        refuse_sealed(path, magic)
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


def read_checkpoint(
    path: pathlib.Path, *, sha256: str | None = None, key: AtRestKey | None = None
) -> Model:
    """Read a checkpoint written by :func:`write_checkpoint` into memory.

    Args:
        path: The checkpoint file.
        sha256: The digest its plain bytes must have (the committed round's).
        key: The key it was encrypted with; None for a plain checkpoint. An
            encrypted file is decrypted a chunk at a time straight into the
            model's buffer, each chunk authenticated before it is used.

    Raises:
        StoreError: The file is missing, truncated, corrupt or its hash differs.
        IntegrityError: With `key`: the file is plain, was encrypted under another
            key, or was modified or truncated.
        ConfigError: Without `key`: the file is encrypted.
    """
    try:
        with open(path, "rb") as handle:
            source: io.BufferedReader | SealedReader = handle
            if key is not None:
                source = SealedReader.open(handle, path=path, key=key, purpose=Purpose.CHECKPOINT)
            layout, prefix = _read_header(source, path)
            payload = np.empty(layout.payload_bytes, dtype=np.uint8)
            if source.readinto(payload.data) != layout.payload_bytes or source.read(1):
                raise StoreError(f"{path}: payload length differs from its header")
    except OSError as err:
        raise StoreError(f"cannot read checkpoint {path}: {err.strerror}") from err
    if sha256 is not None:
        digest = hashlib.sha256(prefix)
        digest.update(payload.data)
        _check_digest(path, digest.hexdigest(), sha256)
    return Model(layout=layout, payload=payload)


def map_checkpoint(
    path: pathlib.Path, *, sha256: str | None = None, key: AtRestKey | None = None
) -> Model:
    """Map a checkpoint's payload read-only, without reading it into memory.

    The coordinator serves the global model this way: its pages live in the
    kernel's page cache, which the process shares and the kernel may reclaim,
    and the server maps in only the chunks it is sending (see
    :meth:`Model.evict`). The file must not be modified while mapped;
    checkpoints are written once, to a temporary name, and renamed into place.

    An encrypted checkpoint (`key` given) cannot be served from its pages: it
    is decrypted into memory instead (:func:`read_checkpoint`), so the
    coordinator then holds the served model in its own memory, beside the
    round's sum.

    Raises:
        StoreError: The file is missing, truncated, corrupt or its hash differs.
        IntegrityError: With `key`: see :func:`read_checkpoint`.
        ConfigError: Without `key`: the file is encrypted.
    """
    if key is not None:
        return read_checkpoint(path, sha256=sha256, key=key)
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
