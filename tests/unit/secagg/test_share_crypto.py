"""Share encryption: a key per direction, a fresh nonce per message, the documented layouts."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpriv.errors import InvalidShare
from fedpriv.secagg import crypto


def lp(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


def documented_binding(label: bytes, session: str, round: int, first: str, second: str) -> bytes:
    """The layout docs/secure-aggregation.md gives, written out independently."""
    return label + b"\x00" + lp(session) + struct.pack(">Q", round) + lp(first) + lp(second)


def test_share_keys_differ_by_direction_and_both_ends_agree_on_each():
    # Arrange
    a, b = crypto.KeyPair(), crypto.KeyPair()
    binding = {"session": "s1", "round": 3}
    # Act
    a_to_b_at_a = crypto.share_key(a, b.public_bytes, sender="a", receiver="b", **binding)
    a_to_b_at_b = crypto.share_key(b, a.public_bytes, sender="a", receiver="b", **binding)
    b_to_a_at_a = crypto.share_key(a, b.public_bytes, sender="b", receiver="a", **binding)
    b_to_a_at_b = crypto.share_key(b, a.public_bytes, sender="b", receiver="a", **binding)
    # Assert
    assert a_to_b_at_a == a_to_b_at_b
    assert b_to_a_at_a == b_to_a_at_b
    assert a_to_b_at_a != b_to_a_at_a


def test_keys_are_bound_to_session_round_and_purpose():
    a, b = crypto.KeyPair(), crypto.KeyPair()
    keys = {
        crypto.share_key(a, b.public_bytes, session="s1", round=1, sender="a", receiver="b"),
        crypto.share_key(a, b.public_bytes, session="s2", round=1, sender="a", receiver="b"),
        crypto.share_key(a, b.public_bytes, session="s1", round=2, sender="a", receiver="b"),
        crypto.pairwise_mask_seed(a, b.public_bytes, session="s1", round=1, silos=("a", "b")),
    }
    assert len(keys) == 4


def test_the_pairwise_mask_seed_is_the_same_at_both_ends():
    a, b = crypto.KeyPair(), crypto.KeyPair()
    at_a = crypto.pairwise_mask_seed(a, b.public_bytes, session="s", round=1, silos=("a", "b"))
    at_b = crypto.pairwise_mask_seed(b, a.public_bytes, session="s", round=1, silos=("b", "a"))
    assert at_a == at_b


def test_hkdf_info_and_associated_data_follow_the_documented_layout():
    # Arrange: a fixed key pair, so the key can be recomputed with bare primitives
    a = crypto.KeyPair.from_private_bytes(bytes(range(32)))
    b = crypto.KeyPair.from_private_bytes(bytes(range(32, 64)))
    shared = a.private.exchange(x25519.X25519PublicKey.from_public_bytes(b.public_bytes))

    def hkdf(info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)

    # Act / Assert
    assert crypto.share_key(
        a, b.public_bytes, session="sess", round=7, sender="silo-b", receiver="silo-a"
    ) == hkdf(documented_binding(b"fedpriv/v1/secagg/share-key", "sess", 7, "silo-b", "silo-a"))
    assert crypto.pairwise_mask_seed(
        a, b.public_bytes, session="sess", round=7, silos=("silo-b", "silo-a")
    ) == hkdf(documented_binding(b"fedpriv/v1/secagg/pairwise-mask", "sess", 7, "silo-a", "silo-b"))
    assert crypto.share_associated_data(
        session="sess", round=7, sender="silo-b", receiver="silo-a"
    ) == documented_binding(b"fedpriv/v1/secagg/share", "sess", 7, "silo-b", "silo-a")


def test_a_sealed_share_is_nonce_then_aes_gcm_and_opens_with_bare_aes_gcm():
    key, associated = bytes(range(32)), b"ad"
    sealed = crypto.encrypt(key, b"x" * 134, associated=associated)
    assert len(sealed) == crypto.NONCE_BYTES + 134 + 16
    nonce, body = sealed[: crypto.NONCE_BYTES], sealed[crypto.NONCE_BYTES :]
    assert AESGCM(key).decrypt(nonce, body, associated) == b"x" * 134


def test_every_encryption_draws_a_new_nonce():
    key = bytes(32)
    nonces = {crypto.encrypt(key, b"p", associated=b"")[:12] for _ in range(200)}
    assert len(nonces) == 200


@pytest.mark.parametrize(
    "tamper",
    [
        lambda s: s[:-1],
        lambda s: s[:11],
        lambda s: bytes([s[0] ^ 1]) + s[1:],
        lambda s: s[:20] + bytes([s[20] ^ 1]) + s[21:],
    ],
    ids=["truncated-tag", "shorter-than-a-nonce", "other-nonce", "flipped-body"],
)
def test_a_tampered_share_does_not_open(tamper):
    key = bytes(32)
    sealed = crypto.encrypt(key, b"share bytes", associated=b"ad")
    with pytest.raises(InvalidShare):
        crypto.decrypt(key, tamper(sealed), associated=b"ad")


def test_a_share_does_not_open_under_other_associated_data():
    key = bytes(32)
    right = crypto.share_associated_data(session="s", round=1, sender="a", receiver="b")
    reversed_direction = crypto.share_associated_data(
        session="s", round=1, sender="b", receiver="a"
    )
    other_round = crypto.share_associated_data(session="s", round=2, sender="a", receiver="b")
    sealed = crypto.encrypt(key, b"share", associated=right)
    for wrong in (reversed_direction, other_round):
        with pytest.raises(InvalidShare):
            crypto.decrypt(key, sealed, associated=wrong)


def test_names_cannot_be_shifted_between_fields():
    # Length prefixes: ("ab", "c") and ("a", "bc") bind differently.
    one = crypto.share_associated_data(session="s", round=1, sender="ab", receiver="c")
    other = crypto.share_associated_data(session="s", round=1, sender="a", receiver="bc")
    assert one != other
