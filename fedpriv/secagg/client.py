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

Peers are not trusted either. A peer whose advertised key is malformed or of
small order, or whose key agreement fails, is left out of the round as if it
had dropped. A share ciphertext that does not authenticate is reported
(:attr:`ClientSession.invalid_senders`) and this silo reveals nothing about
its sender. A roster that names a silo twice, leaves this silo out, changes a
key between steps or grows between steps raises :class:`~fedpriv.errors.SecAggError`:
the silo takes no further part in the round.
"""

from __future__ import annotations

import logging
import secrets
import struct
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from fedpriv.errors import InvalidPublicKey, InvalidShare, ProtocolError, SecAggError
from fedpriv.secagg import crypto, graph, shamir
from fedpriv.secagg.fused import apply_masks
from fedpriv.secagg.relay import collect_contributions, collect_peers, collect_shares

__all__ = [
    "ClientSession",
    "MASK_SLICE",
    "SHARE_PLAINTEXT",
    "collect_contributions",
    "collect_peers",
    "collect_shares",
]

logger = logging.getLogger(__name__)

# Masks are expanded this many elements at a time (4 MiB of keystream).
MASK_SLICE = 1 << 20
# What a silo seals for each peer: the peer's x (u16), then its share of the self-mask
# seed and its share of the mask private key (each a big-endian field element).
SHARE_PLAINTEXT = struct.Struct(f">H{shamir.SHARE_BYTES}s{shamir.SHARE_BYTES}s")
_Share = tuple[str, int, bytes]  # (whose secret, x, y)
_Plain = tuple[int, bytes, bytes]  # (x, seed share, mask-key share)


def _check_threshold(*, silos: int, threshold: int) -> None:
    """Refuse a roster of `silos` unless n/2 < t <= n.

    With t <= n/2 a coordinator could tell half the silos that a peer survived
    and the other half that it dropped, and collect t shares of both its secrets.

    Raises:
        ProtocolError: The threshold is not a majority of the roster, or exceeds it.
    """
    if silos < threshold:
        raise ProtocolError(f"{silos} silos advertised usable keys, {threshold} needed")
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
        degree: k of the announced SecAgg+ graph (0: the complete graph).
        max_dropped: Survivors' neighbours that may be named dropped (SecAgg+).
        corrupt_fraction, security_bits: This silo's own assumption: it takes no
            part in a graph whose security bound, with that share of the round's
            silos colluding with the coordinator, exceeds 2^-security_bits
            (:func:`~fedpriv.secagg.graph.refusal`).

    Raises:
        ProtocolError: `threshold` is below 1.
    """

    def __init__(
        self,
        *,
        silo: str,
        session: str,
        round: int,
        threshold: int,
        degree: int = 0,
        max_dropped: int = 0,
        corrupt_fraction: float = graph.DEFAULT_CORRUPT_FRACTION,
        security_bits: int = graph.DEFAULT_SECURITY_BITS,
    ) -> None:
        if threshold < 1:
            raise ProtocolError(f"secure-aggregation threshold {threshold}: must be >= 1")
        if degree and not degree + 1 < 2 * threshold <= 2 * (degree + 1):
            raise ProtocolError(
                f"threshold {threshold} is not more than half of a neighbourhood of "
                f"{degree + 1} silos; this silo takes no part"
            )
        self.silo = silo
        self.session = session
        self.round = round
        self.threshold = threshold
        self.degree = degree
        self.max_dropped = max_dropped
        self._assumption = (corrupt_fraction, security_bits)
        self._contribution = secrets.token_bytes(graph.CONTRIBUTION_BYTES)
        self._commitments: dict[str, bytes] = {}
        self.neighbours: frozenset[str] | None = None
        """With a degree: this silo's neighbours in the round's graph, once it is fixed."""
        self._cipher = crypto.KeyPair()
        self._mask = crypto.KeyPair()
        self._seed = secrets.token_bytes(32)
        self._advertised: dict[str, tuple[bytes, bytes]] = {}
        self._peers: dict[str, tuple[bytes, bytes]] = {}
        # Derived once per peer when the keys arrive: (key out, key in, pairwise seed).
        self._derived: dict[str, tuple[bytes, bytes, bytes]] = {}
        self._index: dict[str, int] = {}
        self._own: _Plain | None = None
        self._held: dict[str, _Plain] = {}
        self._sharers: list[str] = []
        self._revealed = False
        self.excluded: dict[str, str] = {}
        """Peers left out of the round for a bad key or key agreement, with the reason."""
        self.invalid_senders: tuple[str, ...] = ()
        """Peers whose share ciphertext to this silo did not authenticate."""

    def advertise(self) -> tuple[bytes, bytes]:
        """The public keys to advertise: (cipher, mask)."""
        return self._cipher.public_bytes, self._mask.public_bytes

    @property
    def commitment(self) -> bytes:
        """With a degree: the commitment to this silo's graph contribution (else empty)."""
        if not self.degree:
            return b""
        return graph.commitment(
            session=self.session, round=self.round, silo=self.silo, contribution=self._contribution
        )

    def open_contribution(self) -> bytes:
        """The graph contribution, opened once the key list (and its commitments) is fixed.

        Raises:
            ProtocolError: The peers are not set yet (opening earlier would let the
                coordinator pick the list knowing every contribution).
        """
        if not self._advertised or not self.degree:
            raise ProtocolError("the graph contribution opens after the key list, with a degree")
        return self._contribution

    def set_graph(self, contributions: Mapping[str, bytes], neighbours: Collection[str]) -> None:
        """Fix the round's graph from every listed silo's contribution; check the coordinator's.

        This silo then shares and masks with its neighbours only.

        Raises:
            SecAggError: A listed silo's contribution is missing, does not open its
                commitment, or this silo's own was changed; or `neighbours` (the
                coordinator's routing) is not the graph the contributions fix.
            ProtocolError: Fewer than t of this silo's neighbourhood have usable keys.
        """
        if self.neighbours is not None or not self._advertised or not self.degree:
            raise SecAggError("the round's graph was already set, or is not expected")
        if set(contributions) != set(self._advertised):
            raise SecAggError(
                "the coordinator's graph contributions are not exactly those of the key list: "
                f"missing {sorted(set(self._advertised) - set(contributions))}, "
                f"unknown {sorted(set(contributions) - set(self._advertised))}"
            )
        if contributions[self.silo] != self._contribution:
            raise SecAggError("the coordinator changed this silo's graph contribution")
        for name, value in contributions.items():
            expected = self._commitments.get(name, b"")
            if len(value) != graph.CONTRIBUTION_BYTES or expected != graph.commitment(
                session=self.session, round=self.round, silo=name, contribution=value
            ):
                raise SecAggError(
                    f"silo {name!r}'s graph contribution does not open its commitment"
                )
        seed = graph.graph_seed(session=self.session, round=self.round, contributions=contributions)
        try:
            fixed = graph.harary_neighbours(sorted(self._advertised), degree=self.degree, seed=seed)
        except ValueError as err:
            raise SecAggError(f"the announced graph cannot be built: {err}") from None
        mine = fixed[self.silo]
        if set(neighbours) != mine or len(set(neighbours)) != len(neighbours):
            raise SecAggError(
                "the coordinator routes shares over a graph that is not the one the silos' "
                "contributions fix; this silo takes no part"
            )
        self.neighbours = mine
        keep = mine | {self.silo}
        self._peers = {n: keys for n, keys in self._peers.items() if n in keep}
        self._derived = {n: d for n, d in self._derived.items() if n in keep}
        if len(self._peers) < self.threshold:
            raise ProtocolError(
                f"{len(self._peers)} silos of this neighbourhood have usable keys, "
                f"{self.threshold} needed"
            )

    def _derive(self, name: str, cipher: bytes, mask: bytes) -> tuple[bytes, bytes, bytes]:
        """Both share keys and the pairwise seed with peer `name`.

        Raises:
            InvalidPublicKey: A key is malformed or of small order, or agreement failed.
        """
        if cipher == mask:
            raise InvalidPublicKey("the peer advertised the same key for shares and masks")
        session, round = self.session, self.round
        return (
            crypto.share_key(
                self._cipher, cipher, session=session, round=round, sender=self.silo, receiver=name
            ),
            crypto.share_key(
                self._cipher, cipher, session=session, round=round, sender=name, receiver=self.silo
            ),
            crypto.pairwise_mask_seed(
                self._mask, mask, session=session, round=round, silos=(self.silo, name)
            ),
        )

    def set_peers(
        self,
        peers: Mapping[str, tuple[bytes, bytes]],
        commitments: Mapping[str, bytes] | None = None,
    ) -> None:
        """Take the advertised keys of every silo in the round (this one included).

        A peer whose keys fail :func:`~fedpriv.secagg.crypto.check_public_key`, or
        whose key agreement fails, is left out (see :attr:`excluded`): this silo
        sends it no share, takes no shares from it and adds no mask for it.

        Raises:
            SecAggError: The peers were already set (a second list, or one with a
                changed key); this silo or its own keys are missing.
            ProtocolError: Fewer than t silos have usable keys, or t is not more
                than half of them.
        """
        if self._advertised:
            if dict(peers) != self._advertised:
                raise SecAggError("the coordinator changed the round's keys between steps")
            raise SecAggError("the round's peers were already set")
        if peers.get(self.silo) != self.advertise():
            raise SecAggError("the coordinator's key list does not carry this silo's own keys")
        usable: dict[str, tuple[bytes, bytes]] = {}
        derived: dict[str, tuple[bytes, bytes, bytes]] = {}
        excluded: dict[str, str] = {}
        for name, (cipher, mask) in peers.items():
            if name == self.silo:
                usable[name] = (cipher, mask)
                continue
            try:
                derived[name] = self._derive(name, cipher, mask)
            except InvalidPublicKey as err:
                excluded[name] = str(err)
                logger.warning(
                    "secagg peer left out round=%d silo=%s peer=%s reason=%s",
                    self.round,
                    self.silo,
                    name,
                    err,
                )
                continue
            usable[name] = (cipher, mask)
        if self.degree:
            # The threshold applies per neighbourhood, checked once the graph is fixed.
            if len(peers) <= self.degree:
                raise ProtocolError(
                    f"a graph of degree {self.degree} needs more than {self.degree} silos, "
                    f"the key list has {len(peers)}"
                )
            commitments = dict(commitments or {})
            if set(commitments) != set(peers) or commitments[self.silo] != self.commitment:
                raise SecAggError("the key list's graph commitments do not match its silos")
            fraction, bits = self._assumption
            refusal = graph.refusal(
                silos=len(peers),
                degree=self.degree,
                threshold=self.threshold,
                max_dropped=self.max_dropped,
                corrupt_fraction=fraction,
                security_bits=bits,
            )
            if refusal is not None:  # before any share leaves this silo
                raise SecAggError(refusal)
            self._commitments = commitments
        else:
            _check_threshold(silos=len(usable), threshold=self.threshold)
        self._advertised = dict(peers)
        self._peers = usable
        self._derived = derived
        self.excluded = excluded
        # Positions come from the whole advertised roster, so that every silo gives a
        # peer the same x whichever peers it left out.
        self._index = {name: i + 1 for i, name in enumerate(sorted(peers))}

    def _associated(self, sender: str, receiver: str) -> bytes:
        return crypto.share_associated_data(
            session=self.session, round=self.round, sender=sender, receiver=receiver
        )

    def share(self) -> dict[str, bytes]:
        """Encrypted shares of the seed and mask key, one per other usable silo (by recipient).

        Raises:
            ProtocolError: The peers are not set, or the secrets were already shared
                (fresh shares of the same secrets would add to what the first gave away).
        """
        if not self._peers or (self.degree and self.neighbours is None):
            raise ProtocolError("the round's peers (or its graph) are not known yet")
        if self._own is not None:
            raise ProtocolError("this silo already shared its secrets this round")
        n = len(self._index)
        seed_shares = dict(shamir.split(self._seed, shares=n, threshold=self.threshold))
        key_shares = dict(
            shamir.split(self._mask.private_bytes, shares=n, threshold=self.threshold)
        )
        out = {}
        for name in sorted(self._peers):
            index = self._index[name]
            plain = SHARE_PLAINTEXT.pack(index, seed_shares[index], key_shares[index])
            if name == self.silo:
                self._own = (index, seed_shares[index], key_shares[index])
                continue
            out[name] = crypto.encrypt(
                self._derived[name][0], plain, associated=self._associated(self.silo, name)
            )
        return out

    def _open(self, sender: str, sealed: bytes) -> _Plain:
        """Decrypt and check the share `sender` addressed to this silo.

        Raises:
            InvalidShare: It did not authenticate, has the wrong length or is for
                another position (which, it does not say).
        """
        plain = crypto.decrypt(
            self._derived[sender][1], sealed, associated=self._associated(sender, self.silo)
        )
        if len(plain) != SHARE_PLAINTEXT.size:
            raise InvalidShare("the share did not authenticate")
        index, seed_y, key_y = SHARE_PLAINTEXT.unpack(plain)
        if index != self._index[self.silo]:
            raise InvalidShare("the share did not authenticate")
        return index, seed_y, key_y

    def receive(self, shares: Mapping[str, bytes]) -> None:
        """Open the ciphertexts other silos addressed to this one.

        A share that does not authenticate is not fatal: its sender is listed in
        :attr:`invalid_senders`, and this silo reveals nothing about that sender.

        Raises:
            SecAggError: A sender is this silo, or a silo this one has no usable keys
                for (the roster grew), or shares were already received.
            ProtocolError: Fewer than t silos shared keys.
        """
        if self._sharers:
            raise SecAggError("the round's shares were already received")
        unknown = set(shares) - set(self._peers)
        if unknown or self.silo in shares:
            raise SecAggError(
                f"shares from silos without usable keys in this round: {sorted(unknown)}"
            )
        held: dict[str, _Plain] = {}
        invalid = []
        for sender in sorted(shares):
            try:
                held[sender] = self._open(sender, shares[sender])
            except InvalidShare:
                invalid.append(sender)
        self._held = held
        self.invalid_senders = tuple(invalid)
        self._sharers = sorted({self.silo, *shares})
        if len(self._sharers) < self.threshold:
            raise ProtocolError(f"{len(self._sharers)} silos shared keys, {self.threshold} needed")

    def total_mask(self, size: int) -> npt.NDArray[np.uint32]:
        """The sum of this silo's self mask and pairwise masks, for `size` elements."""
        total = np.zeros(size, dtype=np.uint32)
        self.mask(total)
        return total

    def mask_seeds(self) -> list[tuple[bytes, bool]]:
        """(seed, add) of the self mask and each pairwise mask: add PRG(seed), or subtract it."""
        seeds: list[tuple[bytes, bool]] = [(self._seed, True)]
        for name in self._sharers:
            if name != self.silo:
                seeds.append((self._derived[name][2], self.silo < name))
        return seeds

    def mask(self, values: npt.NDArray[np.uint32]) -> None:
        """Add the self mask and the pairwise masks to `values` in place (mod 2^32)."""
        apply_masks(values, self.mask_seeds(), sign=1)

    def reveal(
        self, *, survivors: Sequence[str], dropped: Sequence[str]
    ) -> tuple[list[_Share], list[_Share]]:
        """Shares of the survivors' seeds and of the dropped silos' mask keys.

        A session answers one reveal request: a second one, answered or not, is
        refused, so that no roster can be followed by another that names a silo
        the other way round. Silos in :attr:`invalid_senders` get no share: the
        coordinator needs t shares of each secret from the other silos.

        Raises:
            SecAggError: A reveal was already requested; the roster names a silo
                twice, names one both ways, names silos that never shared keys
                (it grew), or leaves out this silo.
            ProtocolError: The roster holds fewer than t survivors, or came before
                this silo shared its secrets.
        """
        if self._revealed:
            raise SecAggError(
                "this silo already answered a reveal request this round; a second could "
                "give away both secrets of one silo"
            )
        self._revealed = True
        if self._own is None:
            raise ProtocolError("a reveal was requested before this silo shared its secrets")
        alive, gone = set(survivors), set(dropped)
        if len(alive) != len(survivors) or len(gone) != len(dropped):
            raise SecAggError("the roster names a silo twice")
        if alive & gone:
            raise SecAggError(f"silos both survived and dropped: {sorted(alive & gone)}")
        # With a graph the roster is the federation's; this silo holds shares of its
        # neighbourhood only.
        roster = set(self._advertised) if self.degree else set(self._sharers)
        if not alive | gone <= roster or self.silo not in alive:
            raise SecAggError("the roster names silos outside this round, or leaves this one out")
        if len(alive) < self.threshold:
            raise ProtocolError(f"{len(alive)} survivors, {self.threshold} needed to unmask")
        if self.degree and len(self._advertised) - len(alive) > self.max_dropped:
            raise ProtocolError(
                f"{len(self._advertised) - len(alive)} of the {len(self._advertised)} listed "
                f"silos are not survivors; the graph's guarantee holds for at most "
                f"{self.max_dropped}, so this silo reveals nothing"
            )
        seeds: list[_Share] = []
        keys: list[_Share] = []
        for name in sorted((alive | gone) & set(self._sharers)):
            if name == self.silo:
                index, seed_y, key_y = self._own
            elif name in self._held:
                index, seed_y, key_y = self._held[name]
            else:
                continue  # its share did not authenticate: nothing to reveal
            if name in alive:
                seeds.append((name, index, seed_y))
            else:
                keys.append((name, index, key_y))
        return seeds, keys
