"""A silo's side of one secure-aggregation round (Bonawitz et al., 2017, honest-but-curious).

The silo draws two X25519 key pairs (one to encrypt shares, one for pairwise
masks) and a 32-byte self-mask seed. It Shamir-shares the seed and the mask
private key among the round's silos, sends each share AES-GCM-encrypted to its
recipient through the coordinator (a key per direction, a fresh nonce per
message), and masks its update:

    y_u = x_u + PRG(b_u) + Σ_{v > u} PRG(s_uv) − Σ_{v < u} PRG(s_uv)   (mod 2^32)

After the coordinator names the silos whose masked updates it summed
(survivors) and those that shared keys but sent nothing (dropped), the silo
reveals its shares of the survivors' seeds and of the dropped silos' mask
keys. It answers one such request per round, never for a silo in both sets,
and takes part only if the threshold t is more than half of the roster: the
coordinator would need t seed shares and t key shares of one silo, from 2t > n
distinct silos, to learn both of its secrets.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag

from fedpriv.errors import ProtocolError
from fedpriv.secagg import crypto, shamir

__all__ = ["ClientSession", "MASK_SLICE"]

# Masks are expanded this many elements at a time (4 MiB of keystream).
MASK_SLICE = 1 << 20
_PLAIN = struct.Struct(f">H{shamir.SHARE_BYTES}s{shamir.SHARE_BYTES}s")
_Share = tuple[str, int, bytes]  # (whose secret, x, y)


def _check_threshold(*, silos: int, threshold: int) -> None:
    """Refuse a roster of `silos` unless n/2 < t <= n.

    With t <= n/2 a coordinator could tell half the silos that a peer survived
    and the other half that it dropped, and collect t shares of both its secrets.

    Raises:
        ProtocolError: The threshold is not a majority of the roster, or exceeds it.
    """
    if silos < threshold:
        raise ProtocolError(f"{silos} silos advertised keys, {threshold} needed")
    if 2 * threshold <= silos:
        raise ProtocolError(
            f"threshold {threshold} is not more than half of the {silos} silos in the round: "
            "a coordinator could then learn both secrets of one silo; this silo takes no part"
        )


class ClientSession:
    """State of one silo in one secure-aggregation round.

    Args:
        silo: This silo's identity (its certificate's name).
        session: The round's secure-aggregation id (the same for every silo); all
            keys and ciphertexts are bound to it.
        round: The round number; keys and ciphertexts are bound to it too.
        threshold: t, the number of shares that recover a secret.

    Raises:
        ProtocolError: `threshold` is below 1.
    """

    def __init__(self, *, silo: str, session: str, round: int, threshold: int) -> None:
        if threshold < 1:
            raise ProtocolError(f"secure-aggregation threshold {threshold}: must be >= 1")
        self.silo = silo
        self.session = session
        self.round = round
        self.threshold = threshold
        self._cipher = crypto.KeyPair()
        self._mask = crypto.KeyPair()
        self._seed = secrets.token_bytes(32)
        self._peers: dict[str, tuple[bytes, bytes]] = {}
        self._index: dict[str, int] = {}
        self._own: tuple[int, bytes, bytes] | None = None
        self._held: dict[str, bytes] = {}
        self._sharers: list[str] = []
        self._revealed = False

    def advertise(self) -> tuple[bytes, bytes]:
        """The public keys to advertise: (cipher, mask)."""
        return self._cipher.public_bytes, self._mask.public_bytes

    def set_peers(self, peers: Mapping[str, tuple[bytes, bytes]]) -> None:
        """Take the advertised keys of every silo in the round (this one included).

        Raises:
            ProtocolError: The peers were already set; this silo or its keys are
                missing; or t is not more than half of the silos (nor at most all).
        """
        if self._peers:
            raise ProtocolError("the round's peers were already set")
        if peers.get(self.silo) != self.advertise():
            raise ProtocolError("the coordinator's key list does not carry this silo's own keys")
        _check_threshold(silos=len(peers), threshold=self.threshold)
        self._peers = dict(peers)
        self._index = {name: i + 1 for i, name in enumerate(sorted(peers))}

    def _share_key(self, sender: str, receiver: str) -> bytes:
        peer = receiver if sender == self.silo else sender
        return crypto.share_key(
            self._cipher,
            self._peers[peer][0],
            session=self.session,
            round=self.round,
            sender=sender,
            receiver=receiver,
        )

    def _associated(self, sender: str, receiver: str) -> bytes:
        return crypto.share_associated_data(
            session=self.session, round=self.round, sender=sender, receiver=receiver
        )

    def share(self) -> dict[str, bytes]:
        """Encrypted shares of the seed and mask key, one per other silo (by recipient).

        Raises:
            ProtocolError: The peers are not set, or the secrets were already shared
                (fresh shares of the same secrets would add to what the first gave away).
        """
        if not self._peers:
            raise ProtocolError("the round's peers are not known yet")
        if self._own is not None:
            raise ProtocolError("this silo already shared its secrets this round")
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
            out[name] = crypto.encrypt(
                self._share_key(self.silo, name),
                plain,
                associated=self._associated(self.silo, name),
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
            pairwise = crypto.pairwise_mask_seed(
                self._mask,
                self._peers[name][1],
                session=self.session,
                round=self.round,
                silos=(self.silo, name),
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
    ) -> tuple[list[_Share], list[_Share]]:
        """Shares of the survivors' seeds and of the dropped silos' mask keys.

        A session answers one reveal request: a second one, answered or not, is
        refused, so that no roster can be followed by another that names a silo
        the other way round.

        Raises:
            ProtocolError: A reveal was already requested; the sets overlap, name
                silos that never shared keys, leave out this silo, or hold fewer
                than t survivors; or a share did not authenticate.
        """
        if self._revealed:
            raise ProtocolError(
                "this silo already answered a reveal request this round; a second could "
                "give away both secrets of one silo"
            )
        self._revealed = True
        if self._own is None:
            raise ProtocolError("a reveal was requested before this silo shared its secrets")
        alive, gone = set(survivors), set(dropped)
        if alive & gone:
            raise ProtocolError(f"silos both survived and dropped: {sorted(alive & gone)}")
        if not alive | gone <= set(self._sharers) or self.silo not in alive:
            raise ProtocolError("the roster names silos outside this round, or leaves this one out")
        if len(alive) < self.threshold:
            raise ProtocolError(f"{len(alive)} survivors, {self.threshold} needed to unmask")
        seeds: list[_Share] = []
        keys: list[_Share] = []
        for name in sorted(alive | gone):
            if name == self.silo:
                index, seed_y, key_y = self._own
            else:
                try:
                    plain = crypto.decrypt(
                        self._share_key(name, self.silo),
                        self._held[name],
                        associated=self._associated(name, self.silo),
                    )
                except InvalidTag:
                    raise ProtocolError(
                        f"the share from silo {name!r} did not authenticate"
                    ) from None
                if len(plain) != _PLAIN.size:
                    raise ProtocolError(f"the share from silo {name!r} has the wrong length")
                index, seed_y, key_y = _PLAIN.unpack(plain)
                if index != self._index[self.silo]:
                    raise ProtocolError(f"the share from silo {name!r} is for another position")
            if name in alive:
                seeds.append((name, index, seed_y))
            else:
                keys.append((name, index, key_y))
        return seeds, keys
