"""Sealed files: AES-256-GCM chunks under a per-file key, written and read a chunk at a time.

The format is described in :mod:`fedpriv.atrest` and docs/encryption-at-rest.md.
"""

from __future__ import annotations

import os
import pathlib
import struct
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedpriv.atrest.keys import AtRestKey, Purpose
from fedpriv.errors import ConfigError, IntegrityError
from fedpriv.storage import write_atomic_parts

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "SealedReader",
    "is_sealed",
    "read_file",
    "refuse_sealed",
    "seal",
    "seal_file",
    "write_file",
]

DEFAULT_CHUNK_BYTES = 1 << 20
# A header is authenticated only once its first chunk is; bound what a forged one can ask for.
_MIN_CHUNK_BYTES, _MAX_CHUNK_BYTES = 1 << 10, 1 << 26
_MAGIC = b"FPAE"
_VERSION = 1
_HEADER = struct.Struct(">4sBBH8sI16s7s")
_TAG_BYTES = 16
_MAX_CHUNKS = 2**32 - 1  # the counter is 4 bytes of the 12-byte nonce
_DOCS = "docs/encryption-at-rest.md"
_WRONG_KEY = "wrong key or the file was modified"


def _chunks(parts: Iterable[bytes | memoryview], size: int) -> Iterator[bytes | memoryview]:
    """Cut `parts` into pieces of exactly `size` bytes, then one shorter (maybe empty) piece.

    Pieces inside one part are views of it; only pieces across parts are copied.
    """
    pending = bytearray()
    for part in parts:
        view = memoryview(part).cast("B")
        if pending:
            take = size - len(pending)
            pending += view[:take]
            view = view[take:]
            if len(pending) < size:
                continue
            yield bytes(pending)
            pending.clear()
        while len(view) >= size:
            yield view[:size]
            view = view[size:]
        pending += view
    yield bytes(pending)


def _nonce(prefix: bytes, index: int, *, last: bool) -> bytes:
    if index >= _MAX_CHUNKS:
        raise IntegrityError("a sealed file may hold at most 2**32 - 1 chunks")
    return prefix + struct.pack(">IB", index, 1 if last else 0)


def seal(
    parts: Iterable[bytes | memoryview],
    *,
    key: AtRestKey,
    purpose: Purpose,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[bytes]:
    """Yield the sealed file of the concatenated `parts`: its header, then each sealed chunk.

    The parts are read once, in order, a chunk at a time: feed the result to
    :func:`fedpriv.storage.write_temporary` and no second copy of the payload is made.

    Example:
        >>> key = AtRestKey.generate()
        >>> sealed = b"".join(seal([b"hello ", b"world"], key=key, purpose=Purpose.LEDGER))
        >>> len(sealed) - _HEADER.size - _TAG_BYTES
        11
    """
    if not _MIN_CHUNK_BYTES <= chunk_bytes <= _MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in [{_MIN_CHUNK_BYTES}, {_MAX_CHUNK_BYTES}]")
    salt, prefix = os.urandom(16), os.urandom(7)
    header = _HEADER.pack(
        _MAGIC, _VERSION, purpose.value, 0, key.id_bytes(), chunk_bytes, salt, prefix
    )
    aead = key.file_aead(salt, purpose)
    yield header
    previous: bytes | memoryview | None = None
    index = 0
    for chunk in _chunks(parts, chunk_bytes):
        if previous is not None:
            yield aead.encrypt(_nonce(prefix, index, last=False), previous, header)
            index += 1
        previous = chunk
    assert previous is not None  # _chunks always yields a last piece
    yield aead.encrypt(_nonce(prefix, index, last=True), previous, header)


class SealedReader:
    """Reads a sealed file's plaintext, checking every chunk before handing it out.

    Open it with :meth:`open`. :meth:`read` and :meth:`readinto` work like a
    binary file's; reaching the end (a read that returns nothing) proves the
    last chunk was there and authentic.
    """

    def __init__(
        self,
        handle: BinaryIO,
        *,
        path: pathlib.Path,
        aead: AESGCM,
        header: bytes,
        chunk_bytes: int,
        body_bytes: int,
    ) -> None:
        self._handle = handle
        self._path = path
        self._aead = aead
        self._header = header
        self._prefix = header[-7:]
        self._record = chunk_bytes + _TAG_BYTES
        self._chunks = body_bytes // self._record + 1
        self._last_record = body_bytes % self._record
        self._index = 0
        self._buffer = bytearray(chunk_bytes)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0

    @classmethod
    def open(
        cls, handle: BinaryIO, *, path: pathlib.Path, key: AtRestKey, purpose: Purpose
    ) -> SealedReader:
        """Check the header of the sealed file open in `handle` (at its start).

        Raises:
            IntegrityError: It is not a sealed file, holds something else than
                `purpose`, was sealed under another key, or is truncated.
        """
        raw = handle.read(_HEADER.size)
        if raw[: len(_MAGIC)] == _MAGIC and len(raw) < _HEADER.size:
            raise IntegrityError(f"{path} is truncated: its encryption header is incomplete")
        if raw[: len(_MAGIC)] != _MAGIC:
            raise IntegrityError(
                f"{path} is not encrypted, but an encryption key is configured: a plain file "
                "where an encrypted one belongs is refused, since anyone who can write the "
                f"folder could have put it there. To encrypt existing files, see {_DOCS}"
            )
        magic, version, kind, _, key_id, chunk_bytes, salt, _ = _HEADER.unpack(raw)
        if version != _VERSION:
            raise IntegrityError(f"{path}: unknown encryption format version {version}")
        if key_id != key.id_bytes():
            raise IntegrityError(
                f"{path} was encrypted under another key (key id {key_id.hex()}; the "
                f"configured key's id is {key.key_id}): {_WRONG_KEY}"
            )
        if kind != purpose.value or not _MIN_CHUNK_BYTES <= chunk_bytes <= _MAX_CHUNK_BYTES:
            raise IntegrityError(f"{path}: header does not authenticate: {_WRONG_KEY}")
        body = os.fstat(handle.fileno()).st_size - _HEADER.size
        if body % (chunk_bytes + _TAG_BYTES) < _TAG_BYTES:
            raise IntegrityError(f"{path} is truncated: its last chunk is missing")
        return cls(
            handle,
            path=path,
            aead=key.file_aead(salt, purpose),
            header=raw,
            chunk_bytes=chunk_bytes,
            body_bytes=body,
        )

    def _next_chunk(self) -> bool:
        """Decrypt the next chunk into the buffer; False after the last one."""
        if self._index >= self._chunks:
            return False
        last = self._index == self._chunks - 1
        length = self._last_record if last else self._record
        sealed = self._handle.read(length)
        if len(sealed) != length:
            raise IntegrityError(f"{self._path} changed size while being read")
        try:
            self._end = self._aead.decrypt_into(
                _nonce(self._prefix, self._index, last=last),
                sealed,
                self._header,
                self._view[: length - _TAG_BYTES],
            )
        except InvalidTag:
            raise IntegrityError(
                f"{self._path}: chunk {self._index} of {self._chunks} does not "
                f"authenticate: {_WRONG_KEY} (or truncated); nothing was loaded from it"
            ) from None
        self._start = 0
        self._index += 1
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:
        """Fill `buffer` with the next plaintext bytes; return how many (fewer only at the end)."""
        target = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(target):
            if self._start == self._end and not self._next_chunk():
                break
            count = min(self._end - self._start, len(target) - filled)
            target[filled : filled + count] = self._view[self._start : self._start + count]
            self._start += count
            filled += count
        return filled

    def read(self, size: int) -> bytes:
        """The next `size` plaintext bytes (fewer only at the end)."""
        out = bytearray(size)
        return bytes(out[: self.readinto(out)])


def is_sealed(path: pathlib.Path) -> bool:
    """Whether `path` starts like a sealed file (False if it is missing or shorter).

    Example:
        >>> import tempfile
        >>> plain = pathlib.Path(tempfile.mkdtemp()) / "plain"
        >>> _ = plain.write_bytes(b"{}")
        >>> is_sealed(plain)
        False
    """
    try:
        with open(path, "rb") as handle:
            return handle.read(len(_MAGIC)) == _MAGIC
    except OSError:
        return False


def refuse_sealed(path: pathlib.Path, raw: bytes) -> None:
    """Raise if `raw`, the start of `path`, is a sealed file while no key is configured.

    Raises:
        ConfigError: It is sealed; configure its key.
    """
    if raw[: len(_MAGIC)] == _MAGIC:
        raise ConfigError(
            f"{path} is encrypted, but no encryption key is configured: set "
            f"encryption_key_file or encryption_key_env to the key it was written with ({_DOCS})"
        )


def read_file(path: pathlib.Path, *, key: AtRestKey, purpose: Purpose) -> bytes:
    """The whole plaintext of a small sealed file (a ledger, a marker).

    Raises:
        OSError: The file is missing (FileNotFoundError) or cannot be read.
        IntegrityError: See :meth:`SealedReader.open` and :meth:`SealedReader.read`.
    """
    with open(path, "rb") as handle:
        reader = SealedReader.open(handle, path=pathlib.Path(path), key=key, purpose=purpose)
        pieces = []
        while piece := reader.read(DEFAULT_CHUNK_BYTES):
            pieces.append(piece)
    return b"".join(pieces)


def write_file(
    path: pathlib.Path, data: bytes, *, key: AtRestKey, purpose: Purpose, mode: int = 0o600
) -> None:
    """Seal `data` into `path` atomically (temp file, fsync, rename).

    Raises:
        OSError: It could not be written; `path` is unchanged.
    """
    write_atomic_parts(path, seal([data], key=key, purpose=purpose), mode=mode)


def seal_file(path: pathlib.Path, *, key: AtRestKey, purpose: Purpose) -> None:
    """Encrypt the plain file `path` in place, atomically: a one-way migration.

    Used to switch an existing ledger or state folder to encryption (see
    docs/encryption-at-rest.md); the file is streamed, not loaded. The file's
    mode is kept.

    Raises:
        IntegrityError: It is already sealed.
        OSError: It could not be read or written; `path` is unchanged.
    """
    path = pathlib.Path(path)
    if is_sealed(path):
        raise IntegrityError(f"{path} is already encrypted")
    with open(path, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode & 0o777
        pieces = iter(lambda: handle.read(DEFAULT_CHUNK_BYTES), b"")
        write_atomic_parts(path, seal(pieces, key=key, purpose=purpose), mode=mode)
