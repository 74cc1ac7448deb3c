"""Encryption at rest: AES-256-GCM for checkpoints and privacy ledgers, streamed in chunks.

A sealed file is a header followed by the payload in sealed chunks::

    header   magic "FPAE" | version u8 | purpose u8 | reserved u16
             | key id 8 B | chunk bytes u32 | salt 16 B | nonce prefix 7 B
    chunk i  AES-256-GCM(file key, nonce = prefix | i (u32, big-endian) | last (u8),
                         plaintext[i * chunk : (i + 1) * chunk], aad = header)

The header is every chunk's associated data. Every chunk but the last holds
exactly ``chunk bytes``; the last holds fewer (possibly none) and is flagged in
its nonce, so a file cut, extended or reordered anywhere fails a tag. The file
key is HKDF-SHA256 of the key under the file's fresh random salt, with the
purpose as info: with the counter, no (key, nonce) pair is ever used twice.
The key id (8 bytes of SHA-256 of the key under a label) tells a wrong key from
a damaged file. docs/encryption-at-rest.md describes the format in full.

Files are written and read a chunk (1 MiB) at a time: a checkpoint of several
GB is never held twice. A wrong key, a modified or truncated file, or a plain
file where a sealed one is expected raise :class:`IntegrityError`, and nothing
is loaded. Like ``pki/`` and ``secagg/``, this is a recipe module: the only
other place that imports ``cryptography.hazmat``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import logging
import os
import pathlib
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpriv._config import Table
from fedpriv.errors import ConfigError, IntegrityError
from fedpriv.storage import write_atomic_parts

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "AtRestKey",
    "KeySource",
    "Purpose",
    "SealedReader",
    "is_sealed",
    "read_file",
    "refuse_sealed",
    "seal",
    "seal_file",
    "write_file",
]

logger = logging.getLogger(__name__)

KEY_BYTES = 32
DEFAULT_CHUNK_BYTES = 1 << 20
# A header is authenticated only once its first chunk is; bound what a forged one can ask for.
_MIN_CHUNK_BYTES, _MAX_CHUNK_BYTES = 1 << 10, 1 << 26
_MAGIC = b"FPAE"
_VERSION = 1
_HEADER = struct.Struct(">4sBBH8sI16s7s")
_TAG_BYTES = 16
_MAX_CHUNKS = 2**32 - 1  # the counter is 4 bytes of the 12-byte nonce
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOCS = "docs/encryption-at-rest.md"
_WRONG_KEY = "wrong key or the file was modified"


class Purpose(enum.Enum):
    """What a sealed file holds; authenticated in its header."""

    CHECKPOINT = 1
    LEDGER = 2
    LEDGER_MARKER = 3


@dataclass(frozen=True, slots=True)
class AtRestKey:
    """A 256-bit key that seals files at rest; only its key id is ever shown.

    Example:
        >>> AtRestKey.from_text("00" * 32, source="example")
        AtRestKey(key_id='92638690bf222066')
        >>> AtRestKey.generate() == AtRestKey.generate()
        False
    """

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise ConfigError(
                f"an encryption key must be {KEY_BYTES} bytes, not {len(self.secret)}"
            )

    def __repr__(self) -> str:
        return f"AtRestKey(key_id={self.key_id!r})"

    @property
    def key_id(self) -> str:
        """A short hash of the key (hex), shown to tell keys apart."""
        return self._key_id().hex()

    def _key_id(self) -> bytes:
        return hashlib.sha256(b"fedpriv/v1/atrest/key-id\x00" + self.secret).digest()[:8]

    @classmethod
    def generate(cls) -> AtRestKey:
        """A new random key from the OS CSPRNG."""
        return cls(os.urandom(KEY_BYTES))

    def to_text(self) -> str:
        """The key as 64 hex digits, the form :meth:`from_text` reads."""
        return self.secret.hex()

    @classmethod
    def from_text(cls, text: str, *, source: str) -> AtRestKey:
        """Parse a key written as 64 hex digits or as base64 of 32 bytes.

        Args:
            text: The key; surrounding whitespace is ignored.
            source: Where it came from, for messages (never the key itself).

        Raises:
            ConfigError: It is neither form, or not 32 bytes long.
        """
        stripped = text.strip()
        secret: bytes | None = None
        if len(stripped) == 2 * KEY_BYTES:
            try:
                secret = bytes.fromhex(stripped)
            except ValueError:
                secret = None
        if secret is None:
            try:
                secret = base64.b64decode(stripped, validate=True)
            except (binascii.Error, ValueError):
                secret = None
        if secret is None or len(secret) != KEY_BYTES:
            raise ConfigError(
                f"{source}: expected a {KEY_BYTES}-byte key as {2 * KEY_BYTES} hex digits or "
                f"base64 ({len(stripped)} characters arrived); make one with "
                "`openssl rand -hex 32` (see " + _DOCS + ")"
            )
        return cls(secret)

    @classmethod
    def from_file(cls, path: pathlib.Path) -> AtRestKey:
        """Read a key from a file; warns if others than its owner can read it.

        Raises:
            ConfigError: The file cannot be read or holds no valid key.
        """
        try:
            text = pathlib.Path(path).read_text()
            mode = os.stat(path).st_mode
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read the encryption key file {path}: {err}") from err
        if mode & 0o077:
            logger.warning(
                "encryption key file %s can be read by others than its owner (mode %o); "
                "run `chmod 600 %s`",
                path,
                mode & 0o777,
                path,
            )
        return cls.from_text(text, source=f"encryption key file {path}")

    @classmethod
    def from_env(cls, name: str, *, environ: Mapping[str, str] | None = None) -> AtRestKey:
        """Read a key from the environment variable `name`.

        Raises:
            ConfigError: The variable is unset or holds no valid key.
        """
        environment = os.environ if environ is None else environ
        text = environment.get(name)
        if not text:
            raise ConfigError(
                f"environment variable {name} holds no encryption key; export it, or "
                "configure encryption_key_file instead"
            )
        return cls.from_text(text, source=f"environment variable {name}")

    def _file_key(self, salt: bytes, purpose: Purpose) -> AESGCM:
        info = b"fedpriv/v1/atrest/" + purpose.name.lower().encode()
        derived = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info)
        return AESGCM(derived.derive(self.secret))


@dataclass(frozen=True, slots=True, kw_only=True)
class KeySource:
    """Where an encryption key comes from: a file or an environment variable (one of them).

    Args:
        file: A file holding the key (hex or base64).
        env: The name of an environment variable holding it.
    """

    file: pathlib.Path | None = None
    env: str | None = None

    def __post_init__(self) -> None:
        if (self.file is None) == (self.env is None):
            raise ConfigError(
                "set one of encryption_key_file and encryption_key_env, not "
                + ("both" if self.file is not None else "neither")
            )
        if self.env is not None and not _ENV_NAME.fullmatch(self.env):
            raise ConfigError(
                f"encryption_key_env = {self.env!r}: expected an environment variable name"
            )

    @classmethod
    def from_table(cls, table: Table) -> KeySource | None:
        """Read ``encryption_key_file`` / ``encryption_key_env`` from `table`; None if neither.

        Raises:
            ConfigError: Both are set, or the variable name is not one.
        """
        file = table.path("encryption_key_file")
        env = table.optional("encryption_key_env", str)
        if file is None and env is None:
            return None
        if file is not None and env is not None:
            raise ConfigError(
                f"{table.name('encryption_key_file')} and {table.name('encryption_key_env')} "
                "are both set: the key comes from one of them"
            )
        return cls(file=file, env=env)

    def load(self, *, environ: Mapping[str, str] | None = None) -> AtRestKey:
        """Read the key now (at start, not at import).

        Raises:
            ConfigError: It cannot be read or is not a valid key.
        """
        if self.file is not None:
            return AtRestKey.from_file(self.file)
        assert self.env is not None  # __post_init__ guarantees one of the two
        return AtRestKey.from_env(self.env, environ=environ)


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
        _MAGIC, _VERSION, purpose.value, 0, key._key_id(), chunk_bytes, salt, prefix
    )
    aead = key._file_key(salt, purpose)
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
        if key_id != key._key_id():
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
            aead=key._file_key(salt, purpose),
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
