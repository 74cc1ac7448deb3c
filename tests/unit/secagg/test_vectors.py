"""Known-answer vectors: fedpriv's secure-aggregation encodings give the bytes docs/protocol.md fixes.

The RFC 7748 and RFC 5869 vectors check the primitives; the ``secagg_*.json``
vectors (written by tests/vectors/generate_secagg.py from the documented
layouts) check fedpriv's HKDF info, key derivation, mask expansion, Shamir
shares, share plaintext and AES-GCM sealing. A silo in another language can run
the same files against its own code.
"""

from __future__ import annotations

import json
import pathlib
import types
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpriv.errors import InvalidShare
from fedpriv.secagg import crypto, shamir
from fedpriv.secagg.client import SHARE_PLAINTEXT

VECTORS = pathlib.Path(__file__).resolve().parents[2] / "vectors"


def load(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return loaded


KDF = load("secagg_kdf.json")["cases"]
MASK = load("secagg_mask.json")["cases"]
SHAMIR = load("secagg_shamir.json")
AEAD = load("secagg_share_aead.json")
X25519 = load("x25519_rfc7748.json")
HKDF_RFC = load("hkdf_sha256_rfc5869.json")["cases"]


def key_pair(private_hex: str) -> crypto.KeyPair:
    return crypto.KeyPair.from_private_bytes(bytes.fromhex(private_hex))


# ---- the primitives -----------------------------------------------------------------


@pytest.mark.parametrize("vector", X25519["scalar_mult"], ids=["5.2-1", "5.2-2"])
def test_x25519_matches_rfc7748_scalar_multiplication(vector):
    private = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(vector["scalar"]))
    peer = x25519.X25519PublicKey.from_public_bytes(bytes.fromhex(vector["u"]))

    assert private.exchange(peer).hex() == vector["output"]


def test_x25519_key_pairs_and_agreement_match_rfc7748_diffie_hellman():
    vector = X25519["diffie_hellman"]
    alice, bob = key_pair(vector["alice_private"]), key_pair(vector["bob_private"])

    assert alice.public_bytes.hex() == vector["alice_public"]
    assert bob.public_bytes.hex() == vector["bob_public"]
    for mine, theirs in ((alice, bob), (bob, alice)):
        public = x25519.X25519PublicKey.from_public_bytes(theirs.public_bytes)
        assert mine.private.exchange(public).hex() == vector["shared"]
    assert alice.private_bytes.hex() == vector["alice_private"]


@pytest.mark.parametrize("vector", HKDF_RFC, ids=[v["name"] for v in HKDF_RFC])
def test_hkdf_sha256_matches_rfc5869(vector):
    salt = bytes.fromhex(vector["salt"]) or None  # A.3: no salt, as fedpriv derives
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=vector["length"],
        salt=salt,
        info=bytes.fromhex(vector["info"]),
    ).derive(bytes.fromhex(vector["ikm"]))

    assert okm.hex() == vector["okm"]


# ---- fedpriv's encodings ----------------------------------------------------------


@pytest.mark.parametrize("vector", KDF, ids=["ascii", "utf8-long-round"])
def test_hkdf_info_bytes_match_the_vectors(vector):
    binding = {"session": vector["session"], "round": vector["round"]}
    u, v = vector["u"], vector["v"]

    assert (
        crypto.share_key_info(**binding, sender=u, receiver=v).hex()
        == vector["share_key_info_u_to_v"]
    )
    assert (
        crypto.share_key_info(**binding, sender=v, receiver=u).hex()
        == vector["share_key_info_v_to_u"]
    )
    for pair in ((u, v), (v, u)):
        assert (
            crypto.pairwise_mask_info(**binding, silos=pair).hex() == vector["pairwise_mask_info"]
        )


@pytest.mark.parametrize("vector", KDF, ids=["ascii", "utf8-long-round"])
def test_derived_share_keys_and_mask_seed_match_the_vectors_at_both_ends(vector):
    binding = {"session": vector["session"], "round": vector["round"]}
    u, v = vector["u"], vector["v"]
    u_cipher, v_cipher = key_pair(vector["u_cipher_private"]), key_pair(vector["v_cipher_private"])
    u_mask, v_mask = key_pair(vector["u_mask_private"]), key_pair(vector["v_mask_private"])

    for sender, receiver, expected in ((u, v, "share_key_u_to_v"), (v, u, "share_key_v_to_u")):
        at_u = crypto.share_key(
            u_cipher, v_cipher.public_bytes, **binding, sender=sender, receiver=receiver
        )
        at_v = crypto.share_key(
            v_cipher, u_cipher.public_bytes, **binding, sender=sender, receiver=receiver
        )
        assert at_u.hex() == at_v.hex() == vector[expected]
    at_u = crypto.pairwise_mask_seed(u_mask, v_mask.public_bytes, **binding, silos=(u, v))
    at_v = crypto.pairwise_mask_seed(v_mask, u_mask.public_bytes, **binding, silos=(v, u))
    assert at_u.hex() == at_v.hex() == vector["pairwise_mask_seed"]


@pytest.mark.parametrize("vector", MASK, ids=[f"first={v['first']}" for v in MASK])
def test_mask_expansion_matches_the_vectors(vector):
    seed = bytes.fromhex(vector["seed"])

    elements = crypto.mask_elements(seed, first=vector["first"], count=vector["count"])

    assert elements.dtype == np.uint32
    assert elements.tolist() == vector["elements"]


def test_shamir_shares_match_the_vectors_and_any_threshold_recovers_the_secret(monkeypatch):
    # Arrange: the polynomial's random coefficients are the vector's.
    coefficients = iter(int(c, 16) for c in SHAMIR["coefficients"])
    fixed = types.SimpleNamespace(randbelow=lambda bound: next(coefficients))
    monkeypatch.setattr(shamir, "secrets", fixed)
    secret = bytes.fromhex(SHAMIR["secret"])
    expected = [(s["x"], bytes.fromhex(s["y"])) for s in SHAMIR["shares"]]

    # Act
    shares = shamir.split(secret, shares=len(expected), threshold=SHAMIR["threshold"])

    # Assert
    assert [(x, y.hex()) for x, y in shares] == [(x, y.hex()) for x, y in expected]
    assert all(len(y) == shamir.SHARE_BYTES == 66 for _, y in shares)
    assert shamir.combine(expected[2:], threshold=SHAMIR["threshold"]) == secret
    assert shamir.combine(expected[::2], threshold=SHAMIR["threshold"]) == secret


def test_share_plaintext_layout_matches_the_vector():
    x = SHAMIR["share_plaintext_x"]
    y = bytes.fromhex(SHAMIR["shares"][x - 1]["y"])

    plaintext = SHARE_PLAINTEXT.pack(x, y, y)

    assert plaintext.hex() == SHAMIR["share_plaintext"]
    assert SHARE_PLAINTEXT.size == 2 + 66 + 66


def test_share_associated_data_matches_the_vector():
    associated = crypto.share_associated_data(
        session=AEAD["session"],
        round=AEAD["round"],
        sender=AEAD["sender"],
        receiver=AEAD["receiver"],
    )

    assert associated.hex() == AEAD["associated_data"]


def test_sealed_share_matches_the_vector_for_a_fixed_nonce(monkeypatch):
    # Arrange: encrypt draws its nonce from the CSPRNG; here it draws the vector's.
    nonce = bytes.fromhex(AEAD["nonce"])
    monkeypatch.setattr(crypto, "secrets", types.SimpleNamespace(token_bytes=lambda n: nonce[:n]))
    key, plaintext = bytes.fromhex(AEAD["key"]), bytes.fromhex(AEAD["plaintext"])
    associated = bytes.fromhex(AEAD["associated_data"])

    # Act
    sealed = crypto.encrypt(key, plaintext, associated=associated)

    # Assert
    assert sealed.hex() == AEAD["sealed"]
    assert len(sealed) == 12 + 134 + 16 == 162
    assert crypto.decrypt(key, bytes.fromhex(AEAD["sealed"]), associated=associated) == plaintext


def test_sealed_share_does_not_open_under_other_associated_data():
    key, sealed = bytes.fromhex(AEAD["key"]), bytes.fromhex(AEAD["sealed"])
    swapped = crypto.share_associated_data(
        session=AEAD["session"],
        round=AEAD["round"],
        sender=AEAD["receiver"],
        receiver=AEAD["sender"],
    )

    with pytest.raises(InvalidShare):
        crypto.decrypt(key, sealed, associated=swapped)
