"""Write the secure-aggregation known-answer vectors in this folder (run once; output is fixed).

    /work/main/.venv/bin/python tests/vectors/generate_secagg.py    # from the repository root

Each vector is computed from the byte layouts in docs/protocol.md, not by
fedpriv: HKDF from RFC 5869 with the standard library's ``hmac``, the AES-CTR
mask from single AES block encryptions of the counter blocks, Shamir shares by
evaluating the polynomial directly. Only the primitives X25519, AES and
AES-GCM come from ``cryptography``; the RFC 7748 and RFC 5869 vectors beside
these check those. ``tests/unit/secagg/test_vectors.py`` then checks that
fedpriv's own functions give the same bytes, so a change of any encoding fails
there. The inputs are fixed, so running this again writes the same files; the
files, not this script, are what the tests read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import pathlib
import struct

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

HERE = pathlib.Path(__file__).resolve().parent

# RFC 7748 section 6.1: Alice's and Bob's key pairs (private keys as given there).
ALICE_PRIVATE = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
BOB_PRIVATE = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"
# A fourth party's mask key pair, so that the share key and the mask seed of a pair
# come from different key agreements, as they do in a round.
CAROL_PRIVATE = "c8a9d5a91091ad851c668b0736c1c9a02936c0d3ad62670858088047ba057475"
DAVE_PRIVATE = "5ac99f33632e5a768de7e81bf854c27c46e3fbf2abbacd29ec4aff517369c660"

PRIME = 2**521 - 1
SHARE_BYTES = 66


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF with SHA-256 (an empty salt means 32 zero bytes)."""
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    out, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
    return out[:length]


def lp(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack(">H", len(raw)) + raw


def bind(label: str, *, session: str, round: int, first: str, second: str) -> bytes:
    """label || 0x00 || lp(session) || u64(round) || lp(first) || lp(second)."""
    return (
        label.encode("ascii")
        + b"\x00"
        + lp(session)
        + struct.pack(">Q", round)
        + lp(first)
        + lp(second)
    )


def public(private_hex: str) -> bytes:
    key = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(private_hex))
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def exchange(private_hex: str, peer_public: bytes) -> bytes:
    key = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(private_hex))
    return key.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))


def kdf_vectors() -> dict[str, object]:
    cases = []
    for session, round, u, v in (
        ("00112233445566778899aabbccddeeff", 7, "hospital-a", "hospital-b"),
        # A round beyond 32 bits, non-ASCII names, v sorting before u.
        ("s", 2**40 + 5, "zürich", "clinique-é"),
    ):
        cipher_shared = exchange(ALICE_PRIVATE, public(BOB_PRIVATE))
        mask_shared = exchange(CAROL_PRIVATE, public(DAVE_PRIVATE))
        low, high = sorted((u, v), key=str.encode)
        info_uv = bind(
            "fedpriv/v1/secagg/share-key", session=session, round=round, first=u, second=v
        )
        info_vu = bind(
            "fedpriv/v1/secagg/share-key", session=session, round=round, first=v, second=u
        )
        info_mask = bind(
            "fedpriv/v1/secagg/pairwise-mask", session=session, round=round, first=low, second=high
        )
        cases.append(
            {
                "session": session,
                "round": round,
                "u": u,
                "v": v,
                "u_cipher_private": ALICE_PRIVATE,
                "v_cipher_private": BOB_PRIVATE,
                "u_mask_private": CAROL_PRIVATE,
                "v_mask_private": DAVE_PRIVATE,
                "cipher_shared_secret": cipher_shared.hex(),
                "mask_shared_secret": mask_shared.hex(),
                "share_key_info_u_to_v": info_uv.hex(),
                "share_key_info_v_to_u": info_vu.hex(),
                "pairwise_mask_info": info_mask.hex(),
                "share_key_u_to_v": hkdf_sha256(
                    cipher_shared, salt=b"", info=info_uv, length=32
                ).hex(),
                "share_key_v_to_u": hkdf_sha256(
                    cipher_shared, salt=b"", info=info_vu, length=32
                ).hex(),
                "pairwise_mask_seed": hkdf_sha256(
                    mask_shared, salt=b"", info=info_mask, length=32
                ).hex(),
            }
        )
    return {
        "description": (
            "HKDF-SHA256 (salt none, 32 bytes) over X25519 shared secrets; info = "
            "label || 0x00 || lp(session) || u64be(round) || lp(first) || lp(second), "
            "lp = u16be length || UTF-8. Share keys name sender then receiver; the mask "
            "seed names the pair sorted by UTF-8 bytes."
        ),
        "cases": cases,
    }


def mask_vectors() -> dict[str, object]:
    cases = []
    for seed, first, count in (
        (bytes(range(32)), 0, 16),
        (bytes(range(32)), 5, 7),  # starts inside a 16-byte block
        (bytes(32), 0, 8),
        (bytes(range(32, 64)), (1 << 20) + 3, 6),  # past the first 4 MiB slice
        (bytes(range(32, 64)), 2**34 - 2, 4),  # a counter past 32 bits
    ):
        block, skip = divmod(4 * first, 16)
        ecb = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
        blocks = -(-(skip + 4 * count) // 16)
        stream = b"".join(ecb.update((block + i).to_bytes(16, "big")) for i in range(blocks))[
            skip : skip + 4 * count
        ]
        elements = list(struct.unpack(f"<{count}I", stream))
        cases.append({"seed": seed.hex(), "first": first, "count": count, "elements": elements})
    return {
        "description": (
            "Mask element i of a 32-byte seed: keystream bytes 4i..4i+3 of AES-256-CTR "
            "(initial counter block 0, the whole 16-byte block a big-endian counter), read "
            "as a little-endian uint32."
        ),
        "cases": cases,
    }


def shamir_vectors() -> dict[str, object]:
    secret = bytes(range(1, 33))
    coefficients = [
        int.from_bytes(hashlib.sha512(b"fedpriv shamir vector %d" % i).digest(), "big") % PRIME
        for i in range(2)
    ]
    polynomial = [int.from_bytes(secret, "big"), *coefficients]
    shares = []
    for x in range(1, 6):
        y = sum(c * x**k for k, c in enumerate(polynomial)) % PRIME
        shares.append({"x": x, "y": y.to_bytes(SHARE_BYTES, "big").hex()})
    # The plaintext silo u seals for the peer at x = 2: u16be x || seed share || key share
    # (here the key share is the same polynomial's, for brevity).
    plaintext = struct.pack(">H", 2) + bytes.fromhex(shares[1]["y"]) * 2
    return {
        "description": (
            "Shamir over GF(2^521 - 1): the secret (32 bytes, big-endian) is the constant "
            "term, coefficients[k] the coefficient of x^(k+1); share x = 1..n is the "
            "polynomial at x, 66 bytes big-endian. Share plaintext = u16be x || 66-byte "
            "seed share || 66-byte mask-key share."
        ),
        "secret": secret.hex(),
        "threshold": 3,
        "coefficients": [f"{c:x}" for c in coefficients],
        "shares": shares,
        "share_plaintext_x": 2,
        "share_plaintext": plaintext.hex(),
    }


def aead_vectors(plaintext: bytes) -> dict[str, object]:
    key = bytes(range(100, 132))
    nonce = bytes(range(200, 212))
    session, round, sender, receiver = (
        "00112233445566778899aabbccddeeff",
        7,
        "hospital-a",
        "hospital-b",
    )
    associated = bind(
        "fedpriv/v1/secagg/share", session=session, round=round, first=sender, second=receiver
    )
    sealed = nonce + AESGCM(key).encrypt(nonce, plaintext, associated)
    return {
        "description": (
            "EncryptedShares.ciphertext = nonce (12 bytes) || AES-256-GCM(share key, nonce, "
            "plaintext, associated data) with the 16-byte tag last; associated data = "
            "bind('fedpriv/v1/secagg/share', sender, receiver), authenticated, not sent."
        ),
        "key": key.hex(),
        "nonce": nonce.hex(),
        "session": session,
        "round": round,
        "sender": sender,
        "receiver": receiver,
        "associated_data": associated.hex(),
        "plaintext": plaintext.hex(),
        "sealed": sealed.hex(),
    }


def write(name: str, content: dict[str, object]) -> None:
    (HERE / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")


def main() -> None:
    shamir = shamir_vectors()
    write("secagg_kdf.json", kdf_vectors())
    write("secagg_mask.json", mask_vectors())
    write("secagg_shamir.json", shamir)
    write("secagg_share_aead.json", aead_vectors(bytes.fromhex(str(shamir["share_plaintext"]))))


if __name__ == "__main__":
    main()
