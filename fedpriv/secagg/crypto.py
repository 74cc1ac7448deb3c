"""SecAgg primitives from the ``cryptography`` package: X25519, HKDF-SHA256, AES-GCM, AES-CTR.

Every derived key is bound by HKDF ``info`` to its purpose, the task and both
parties, so a key agreed for one round, pair or purpose is useless for another.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "KeyPair",
    "agree",
    "decrypt",
    "encrypt",
    "mask_elements",
]

_INFO_PREFIX = b"fedpriv secagg v1\x00"
_NONCE = bytes(12)  # each AES-GCM key encrypts exactly one message


class KeyPair:
    """An X25519 key pair."""

    def __init__(self, private: x25519.X25519PrivateKey | None = None) -> None:
        self.private = private or x25519.X25519PrivateKey.generate()

    @property
    def public_bytes(self) -> bytes:
        """The 32-byte raw public key."""
        return self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def private_bytes(self) -> bytes:
        """The 32-byte raw private key (only ever Shamir-shared)."""
        return self.private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        """Rebuild a key pair from its raw private key."""
        return cls(x25519.X25519PrivateKey.from_private_bytes(raw))


def _context(*parts: str) -> bytes:
    return _INFO_PREFIX + b"\x00".join(p.encode() for p in parts)


def agree(private: KeyPair, peer_public: bytes, *, purpose: str, context: str) -> bytes:
    """A 32-byte key shared by the two parties, bound to `purpose` and `context`.

    Both sides must pass the same `context` (for example the task id and the two
    silo names in sorted order).

    Raises:
        ValueError: `peer_public` is not a valid X25519 public key.
    """
    shared = private.private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
    kdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_context(purpose, context))
    return kdf.derive(shared)


def encrypt(key: bytes, plaintext: bytes, *, associated: bytes) -> bytes:
    """AES-256-GCM under a single-use `key`; `associated` is authenticated, not sent."""
    return AESGCM(key).encrypt(_NONCE, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, *, associated: bytes) -> bytes:
    """Open :func:`encrypt`'s output.

    Raises:
        cryptography.exceptions.InvalidTag: Wrong key, tampered text or other `associated`.
    """
    return AESGCM(key).decrypt(_NONCE, ciphertext, associated)


_ZEROS = bytes((1 << 22) + 32)  # plaintext for keystream slices of up to 4 MiB


def mask_elements(
    seed: bytes, *, first: int, count: int, buffer: bytearray | None = None
) -> npt.NDArray[np.uint32]:
    """Elements ``first .. first + count`` of the uint32 mask that `seed` expands to.

    The mask is the AES-256-CTR keystream of `seed` (counter from 0), read as
    little-endian uint32. CTR can start at any block, so a chunk of the mask is
    computed without the elements before it. Pass the same `buffer` to reuse its
    memory (the result is then a view into it, valid until the next call).

    Example:
        >>> whole = mask_elements(bytes(32), first=0, count=10)
        >>> bool((mask_elements(bytes(32), first=3, count=7) == whole[3:]).all())
        True
    """
    start_byte = 4 * first
    block, skip = divmod(start_byte, 16)
    total = skip + 4 * count
    padded = -(-total // 16) * 16
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(block.to_bytes(16, "big"))).encryptor()
    needed = padded + 15  # update_into wants room for one more block
    if buffer is None or len(buffer) < needed:
        buffer = bytearray(needed)
    plain = memoryview(_ZEROS)[:padded] if padded <= len(_ZEROS) else bytes(padded)
    encryptor.update_into(plain, buffer)
    return np.frombuffer(buffer, dtype="<u4", count=count, offset=skip)
