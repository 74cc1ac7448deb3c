"""SecAgg primitives from the ``cryptography`` package: X25519, HKDF-SHA256, AES-GCM, AES-CTR.

Every derived key is bound by HKDF ``info`` to one purpose, the round's session
id and round number, and its parties: a share key to its sender and receiver in
that order (one key per direction), a pairwise mask seed to the unordered pair
(both ends must expand the same mask, so that it cancels). AES-GCM draws a fresh
96-bit nonce from the OS CSPRNG for every message and sends it in front of the
ciphertext; callers never handle nonces. The byte layouts are specified in
docs/protocol.md, so that a client in another language can implement them; the
known-answer vectors in tests/vectors/ pin them.

Every public key a peer advertises passes :func:`check_public_key`, and every
error that ``cryptography`` raises for a peer's bytes leaves this module as an
:class:`~fedpriv.errors.InvalidPublicKey` or :class:`~fedpriv.errors.InvalidShare`.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidKey, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpriv.errors import InvalidPublicKey, InvalidShare

__all__ = [
    "NONCE_BYTES",
    "PUBLIC_KEY_BYTES",
    "KeyPair",
    "check_public_key",
    "decrypt",
    "encrypt",
    "mask_elements",
    "masks_left_by",
    "pairwise_mask_info",
    "pairwise_mask_seed",
    "share_associated_data",
    "share_key",
    "share_key_info",
]

# Labels: one per use, so no key, seed or associated data of one use is valid for another.
_SHARE_KEY_LABEL = b"fedpriv/v1/secagg/share-key"
_SHARE_AD_LABEL = b"fedpriv/v1/secagg/share"
_MASK_LABEL = b"fedpriv/v1/secagg/pairwise-mask"
# 96 bits, drawn per message. Each share key seals one message, so a nonce can never
# repeat under a key; the random nonce keeps that true even if a key were reused.
NONCE_BYTES = 12
_MAX_FIELD = 0xFFFF
_ROUND = struct.Struct(">Q")
PUBLIC_KEY_BYTES = 32
_P = 2**255 - 19
# u-coordinates of the X25519 points of small order (1, 2, 4 and 8), after
# libsodium's blocklist in crypto_scalarmult/curve25519/ref10/x25519_ref10.c
# (has_small_order), which also lists p and p + 1, the non-canonical encodings
# of 0 and 1. A key agreement with any of them gives a shared secret of all
# zeros, whatever the private key: anyone could compute it.
_SMALL_ORDER_U = frozenset(
    {
        0,  # order 4
        1,  # order 1
        325606250916557431795983626356110631294008115727848805560023387167927233504,  # 8
        39382357235489614581723060781553021112529911719440698176882885853963445705823,  # 8
        _P - 1,  # order 2
    }
)
_CRYPTO_ERRORS = (ValueError, TypeError, InvalidKey, InvalidTag, UnsupportedAlgorithm)


def check_public_key(raw: bytes) -> bytes:
    """Return `raw` if it is a usable X25519 public key.

    Refuses a key of the wrong length and every encoding of a point of small
    order: the canonical u-coordinates, u + p where that fits in 255 bits, and
    each of those with the top bit set (RFC 7748 ignores that bit).

    Example:
        >>> check_public_key(bytes(32))
        Traceback (most recent call last):
        ...
        fedpriv.errors.InvalidPublicKey: the public key is a point of small order ...

    Raises:
        InvalidPublicKey: `raw` is not 32 bytes, or is a point of small order.
    """
    if not isinstance(raw, bytes) or len(raw) != PUBLIC_KEY_BYTES:
        length = len(raw) if isinstance(raw, bytes | bytearray | memoryview) else "no"
        raise InvalidPublicKey(
            f"an X25519 public key is {PUBLIC_KEY_BYTES} bytes, this one {length}; "
            "advertise the raw key of a fresh X25519 key pair"
        )
    u = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    if u % _P in _SMALL_ORDER_U:
        raise InvalidPublicKey(
            "the public key is a point of small order (for example, all zeros): any key "
            "agreement with it is predictable; advertise the key of a fresh X25519 key pair"
        )
    return raw


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
        """Rebuild a key pair from its raw private key.

        Raises:
            InvalidShare: `raw` is not a 32-byte private key (recovered from bad shares).
        """
        try:
            return cls(x25519.X25519PrivateKey.from_private_bytes(raw))
        except _CRYPTO_ERRORS:
            raise InvalidShare("the recovered private key is malformed") from None


def _field(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > _MAX_FIELD:
        raise ValueError(f"a bound name is {len(raw)} bytes long, at most {_MAX_FIELD} allowed")
    return len(raw).to_bytes(2, "big") + raw


def _binding(label: bytes, *, session: str, round: int, first: str, second: str) -> bytes:
    """``label || 0x00 || lp(session) || u64(round) || lp(first) || lp(second)``.

    ``lp`` is a big-endian u16 length and the UTF-8 bytes: no two different
    tuples encode to the same bytes.
    """
    if not 0 <= round < 1 << 64:
        raise ValueError(f"round {round} does not fit in 64 bits")
    return label + b"\x00" + _field(session) + _ROUND.pack(round) + _field(first) + _field(second)


def _derive(private: KeyPair, peer_public: bytes, info: bytes) -> bytes:
    check_public_key(peer_public)
    try:
        shared = private.private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
    except _CRYPTO_ERRORS as err:
        raise InvalidPublicKey(f"key agreement with the peer's public key failed: {err}") from None
    # OpenSSL refuses an all-zero secret already; checked again so that no backend
    # can let one through.
    if shared == bytes(len(shared)):
        raise InvalidPublicKey("key agreement with the peer's public key gave an all-zero secret")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def share_key(
    private: KeyPair, peer_public: bytes, *, session: str, round: int, sender: str, receiver: str
) -> bytes:
    """The AES-256-GCM key for the shares `sender` addresses to `receiver`.

    Both ends derive it (the sender with its cipher key and the receiver's
    public key, the receiver the other way round); the reverse direction gets a
    different key.

    Raises:
        ValueError: `peer_public` is not a valid X25519 public key.
    """
    info = share_key_info(session=session, round=round, sender=sender, receiver=receiver)
    return _derive(private, peer_public, info)


def share_key_info(*, session: str, round: int, sender: str, receiver: str) -> bytes:
    """HKDF ``info`` of the share key `sender` → `receiver` (its parties in that order)."""
    return _binding(_SHARE_KEY_LABEL, session=session, round=round, first=sender, second=receiver)


def pairwise_mask_info(*, session: str, round: int, silos: tuple[str, str]) -> bytes:
    """HKDF ``info`` of the pairwise mask seed of two silos (names sorted by UTF-8 bytes)."""
    first, second = sorted(silos, key=str.encode)
    return _binding(_MASK_LABEL, session=session, round=round, first=first, second=second)


def pairwise_mask_seed(
    private: KeyPair, peer_public: bytes, *, session: str, round: int, silos: tuple[str, str]
) -> bytes:
    """The AES-256-CTR seed of the mask two silos share (the same for both; never an AEAD key).

    Raises:
        InvalidPublicKey: `peer_public` is not a usable X25519 public key.
    """
    return _derive(
        private, peer_public, pairwise_mask_info(session=session, round=round, silos=silos)
    )


def masks_left_by(
    silo: str, private: bytes, peers: Mapping[str, bytes], *, session: str, round: int
) -> list[tuple[bytes, bool]]:
    """(seed, added) of each pairwise mask that `peers` (mask public keys) share with `silo`.

    `private` is `silo`'s recovered mask private key; added is whether the peer
    added +PRG(seed) (it sorts first) rather than subtracting it.

    Raises:
        InvalidShare: `private` is not a private key.
        InvalidPublicKey: A peer's key is unusable.
    """
    key = KeyPair.from_private_bytes(private)
    return [
        (
            pairwise_mask_seed(key, public, session=session, round=round, silos=(silo, peer)),
            peer < silo,
        )
        for peer, public in peers.items()
    ]


def share_associated_data(*, session: str, round: int, sender: str, receiver: str) -> bytes:
    """AES-GCM associated data of a share: its session, round, sender and receiver."""
    return _binding(_SHARE_AD_LABEL, session=session, round=round, first=sender, second=receiver)


def encrypt(key: bytes, plaintext: bytes, *, associated: bytes) -> bytes:
    """``nonce || AES-256-GCM(key, nonce, plaintext, associated)`` with a fresh random nonce.

    `associated` is authenticated, not sent.
    """
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, sealed: bytes, *, associated: bytes) -> bytes:
    """Open :func:`encrypt`'s output.

    Example:
        >>> key = bytes(32)
        >>> sealed = encrypt(key, b"share", associated=b"ad")
        >>> decrypt(key, sealed, associated=b"ad")
        b'share'

    Raises:
        InvalidShare: Wrong key, tampered or truncated text, or other `associated`
            (which one, it does not say).
    """
    if len(sealed) < NONCE_BYTES + 16:
        raise InvalidShare("the share did not authenticate")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except _CRYPTO_ERRORS:
        raise InvalidShare("the share did not authenticate") from None


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
