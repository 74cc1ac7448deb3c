"""A silo's side of one secure-aggregation round (Bonawitz et al., 2017, honest-but-curious).

The silo draws two X25519 key pairs (one to encrypt shares, one for pairwise
masks) and a 32-byte self-mask seed. It Shamir-shares the seed and the mask
private key among the round's silos, sends each share AES-GCM-encrypted to its
recipient through the coordinator, and masks its update:

    y_u = x_u + PRG(b_u) + Σ_{v > u} PRG(s_uv) − Σ_{v < u} PRG(s_uv)   (mod 2^32)

After the coordinator names the silos whose masked updates it summed
(survivors) and those that shared keys but sent nothing (dropped), the silo
reveals its shares of the survivors' seeds and of the dropped silos' mask
keys, never both for one silo.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from fedpriv.errors import ProtocolError
from fedpriv.secagg import crypto, shamir

__all__ = ["ClientSession", "MASK_SLICE"]

# Masks are expanded this many elements at a time (4 MiB of keystream).
MASK_SLICE = 1 << 20
_PLAIN = struct.Struct(f">H{shamir.SHARE_BYTES}s{shamir.SHARE_BYTES}s")


def share_associated_data(session: str, sender: str, recipient: str) -> bytes:
    """AES-GCM associated data: a share is bound to its session, sender and recipient."""
    return f"{session}\x00{sender}\x00{recipient}".encode()


def pair_context(session: str, a: str, b: str) -> str:
    """HKDF context of the pair {a, b} in this session (the same on both sides)."""
    first, second = sorted((a, b))
    return f"{session}\x00{first}\x00{second}"


class ClientSession:
    """State of one silo in one secure-aggregation round.

    Args:
        silo: This silo's identity (its certificate's name).
        session: The round's secure-aggregation id (the same for every silo); all
            keys and ciphertexts are bound to it.
        threshold: t, the number of shares that recover a secret.
    """

    def __init__(self, *, silo: str, session: str, threshold: int) -> None:
        self.silo = silo
        self.session = session
        self.threshold = threshold
        self._cipher = crypto.KeyPair()
        self._mask = crypto.KeyPair()
        self._seed = secrets.token_bytes(32)
        self._peers: dict[str, tuple[bytes, bytes]] = {}
        self._index: dict[str, int] = {}
        self._own: tuple[int, bytes, bytes] | None = None
        self._held: dict[str, bytes] = {}
        self._sharers: list[str] = []

    def advertise(self) -> tuple[bytes, bytes]:
        """The public keys to advertise: (cipher, mask)."""
        return self._cipher.public_bytes, self._mask.public_bytes

    def set_peers(self, peers: Mapping[str, tuple[bytes, bytes]]) -> None:
        """Take the advertised keys of every silo in the round (this one included).

        Raises:
            ProtocolError: This silo or its keys are missing, or fewer than t silos remain.
        """
        if peers.get(self.silo) != self.advertise():
            raise ProtocolError("the coordinator's key list does not carry this silo's own keys")
        if len(peers) < self.threshold:
            raise ProtocolError(f"{len(peers)} silos advertised keys, {self.threshold} needed")
        self._peers = dict(peers)
        self._index = {name: i + 1 for i, name in enumerate(sorted(peers))}

    def share(self) -> dict[str, bytes]:
        """Encrypted shares of the seed and mask key, one per other silo (by recipient)."""
        n = len(self._peers)
        seed_shares = dict(shamir.split(self._seed, shares=n, threshold=self.threshold))
        key_shares = dict(
            shamir.split(self._mask.private_bytes, shares=n, threshold=self.threshold)
        )
        out = {}
        for name, index in self._index.items():
            plain = _PLAIN.pack(index, seed_shares[index], key_shares[index])
            if name == self.silo:
                self._own = (index, seed_shares[index], key_shares[index])
                continue
            key = crypto.agree(
                self._cipher,
                self._peers[name][0],
                purpose="share",
                context=pair_context(self.session, self.silo, name),
            )
            out[name] = crypto.encrypt(
                key, plain, associated=share_associated_data(self.session, self.silo, name)
            )
        return out

    def receive(self, shares: Mapping[str, bytes]) -> None:
        """Keep the ciphertexts other silos addressed to this one.

        Raises:
            ProtocolError: A sender is unknown, or fewer than t silos shared keys.
        """
        unknown = set(shares) - set(self._peers)
        if unknown or self.silo in shares:
            raise ProtocolError(f"shares from silos that did not advertise keys: {sorted(unknown)}")
        self._held = dict(shares)
        self._sharers = sorted({self.silo, *shares})
        if len(self._sharers) < self.threshold:
            raise ProtocolError(f"{len(self._sharers)} silos shared keys, {self.threshold} needed")

    def total_mask(self, size: int) -> npt.NDArray[np.uint32]:
        """The sum of this silo's self mask and pairwise masks, for `size` elements.

        It does not depend on the update, so a silo can compute it while it trains.
        """
        total = np.zeros(size, dtype=np.uint32)
        self.mask(total)
        return total

    def mask(self, values: npt.NDArray[np.uint32]) -> None:
        """Add the self mask and the pairwise masks to `values` in place (mod 2^32)."""
        seeds: list[tuple[bytes, bool]] = [(self._seed, True)]
        for name in self._sharers:
            if name == self.silo:
                continue
            pairwise = crypto.agree(
                self._mask,
                self._peers[name][1],
                purpose="mask",
                context=pair_context(self.session, self.silo, name),
            )
            seeds.append((pairwise, self.silo < name))
        buffer = bytearray(4 * MASK_SLICE + 32)
        for start in range(0, values.size, MASK_SLICE):
            part = values[start : start + MASK_SLICE]
            for seed, add in seeds:
                mask = crypto.mask_elements(seed, first=start, count=part.size, buffer=buffer)
                if add:
                    part += mask
                else:
                    part -= mask

    def reveal(
        self, *, survivors: Sequence[str], dropped: Sequence[str]
    ) -> tuple[list[tuple[str, int, bytes]], list[tuple[str, int, bytes]]]:
        """Shares of the survivors' seeds and of the dropped silos' mask keys.

        Raises:
            ProtocolError: The sets overlap, name silos that never shared keys,
                leave out this silo, or hold fewer than t survivors.
        """
        alive, gone = set(survivors), set(dropped)
        if alive & gone:
            raise ProtocolError(f"silos both survived and dropped: {sorted(alive & gone)}")
        if not alive | gone <= set(self._sharers) or self.silo not in alive:
            raise ProtocolError("the roster names silos outside this round, or leaves this one out")
        if len(alive) < self.threshold:
            raise ProtocolError(f"{len(alive)} survivors, {self.threshold} needed to unmask")
        assert self._own is not None  # share() ran before any update was sent
        seeds: list[tuple[str, int, bytes]] = []
        keys: list[tuple[str, int, bytes]] = []
        for name in sorted(alive | gone):
            if name == self.silo:
                index, seed_y, key_y = self._own
            else:
                key = crypto.agree(
                    self._cipher,
                    self._peers[name][0],
                    purpose="share",
                    context=pair_context(self.session, self.silo, name),
                )
                plain = crypto.decrypt(
                    key,
                    self._held[name],
                    associated=share_associated_data(self.session, name, self.silo),
                )
                index, seed_y, key_y = _PLAIN.unpack(plain)
            if name in alive:
                seeds.append((name, index, seed_y))
            else:
                keys.append((name, index, key_y))
        return seeds, keys
