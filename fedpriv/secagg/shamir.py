"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

A secret is the constant term of a random polynomial of degree t - 1; share i
is the polynomial at x = i. Any t shares give the secret back by Lagrange
interpolation at 0; fewer reveal nothing. The field is larger than any 32-byte
secret, so a secret is one field element. Coefficients come from ``secrets``.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

__all__ = ["PRIME", "SHARE_BYTES", "combine", "split"]

PRIME = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8)
_SECRET_BYTES = 32


def split(secret: bytes, *, shares: int, threshold: int) -> list[tuple[int, bytes]]:
    """Split `secret` into `shares` shares (x = 1..shares), any `threshold` of which recover it.

    Example:
        >>> parts = split(bytes(range(32)), shares=5, threshold=3)
        >>> combine(parts[1:4], threshold=3) == bytes(range(32))
        True
    """
    if len(secret) != _SECRET_BYTES:
        raise ValueError(f"secret must be {_SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= shares:
        raise ValueError(f"need 1 <= threshold ({threshold}) <= shares ({shares})")
    coefficients = [int.from_bytes(secret, "big")] + [
        secrets.randbelow(PRIME) for _ in range(threshold - 1)
    ]
    out = []
    for x in range(1, shares + 1):
        y = 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % PRIME
        out.append((x, y.to_bytes(SHARE_BYTES, "big")))
    return out


def combine(shares: Sequence[tuple[int, bytes]], *, threshold: int) -> bytes:
    """Recover the secret from at least `threshold` distinct shares.

    Raises:
        ValueError: Too few shares, repeated x, or a result that is not a 32-byte secret
            (a corrupted share).
    """
    points = {x: int.from_bytes(y, "big") for x, y in shares}
    if len(points) != len(shares):
        raise ValueError("shares must have distinct x")
    if len(points) < threshold:
        raise ValueError(f"{len(points)} shares, {threshold} needed")
    chosen = sorted(points.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(chosen):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(chosen):
            if i != j:
                numerator = numerator * (-xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * _SECRET_BYTES):
        raise ValueError("the shares do not recover a 32-byte secret (corrupted share?)")
    return secret.to_bytes(_SECRET_BYTES, "big")
