"""Encryption-at-rest keys: the 256-bit key, where it comes from, and the per-file AEAD it derives.

A key is read from a file (hex or base64, owner-only permissions) or an
environment variable, never at import. Each sealed file derives its own
AES-256-GCM key from it with HKDF-SHA256 under the file's random salt and its
purpose (:class:`Purpose`) as info; the key id tells a wrong key from a
damaged file.
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
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpriv._config import Table
from fedpriv.errors import ConfigError

__all__ = ["KEY_BYTES", "AtRestKey", "KeySource", "Purpose"]

logger = logging.getLogger(__name__)

KEY_BYTES = 32
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOCS = "docs/encryption-at-rest.md"


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
        return self.id_bytes().hex()

    def id_bytes(self) -> bytes:
        """The 8-byte key id that a sealed file's header carries (SHA-256 under a label)."""
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

    def file_aead(self, salt: bytes, purpose: Purpose) -> AESGCM:
        """The AES-256-GCM key of one sealed file: HKDF-SHA256 under its salt, `purpose` as info."""
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
