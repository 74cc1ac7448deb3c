"""The coordinator's side of one secure-aggregation round.

Each step is a barrier over the silos still in the round: a call returns once
every live silo took the step, or the step's deadline passed; silos that miss a
step leave the round. The coordinator relays public keys and ciphertexts it
cannot read, folds masked updates like any other (modular addition), then
collects shares and removes the masks from the sum:

    Σ y_u − Σ_{u ∈ survivors} PRG(b_u) ∓ Σ_{d dropped, u ∈ survivors} PRG(s_du) = Σ x_u

A silo whose advertised keys or shares are malformed is refused and leaves the
round (the barriers stop waiting for it); so does a silo that withdraws. A
survivor may leave out the shares of silos whose ciphertexts did not
authenticate for it; the omission is logged as its report, and a secret that
then has fewer than t shares fails the round, with no model published.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from fedpriv.errors import (
    ConfigError,
    FedprivError,
    InvalidPublicKey,
    ProtocolError,
    RoundFailed,
    SecAggError,
)
from fedpriv.secagg import crypto, graph, shamir
from fedpriv.secagg.fused import apply_masks

__all__ = ["ServerSession"]

logger = logging.getLogger(__name__)
_Share = tuple[str, int, bytes]  # (whose secret, x, y)
_MAX_CIPHERTEXT = 512


class ServerSession:
    """Relay and unmasking state of one round.

    Args:
        session: The round's secure-aggregation id, announced to every silo.
        round: The round number (bound into every key, like the session id).
        tasks: Task id of each silo selected for the round.
        threshold: t, shares needed to recover a secret.
        deadline: Monotonic time by which each barrier gives up waiting.
        alive: Whether a silo is still connected (a gone silo is not waited for).
        clock: Monotonic seconds.
        on_refused: Called with a silo and the reason when its keys or shares are
            refused (it is out of the round); never with the session's lock held.
        degree: k of the round's SecAgg+ graph (0: the complete graph); `threshold`
            then applies per neighbourhood of k + 1 silos.
        max_dropped: With a degree, the listed silos that may be missing from the
            survivors while the round still unmasks.

    Raises:
        ConfigError: `threshold` is not more than half of the silos in `tasks` (of a
            neighbourhood, with a degree).
    """

    def __init__(
        self,
        *,
        session: str,
        round: int,
        tasks: Mapping[str, str],
        threshold: int,
        deadline: float,
        alive: Callable[[str], bool],
        clock: Callable[[], float] = time.monotonic,
        on_refused: Callable[[str, str], None] | None = None,
        degree: int = 0,
        max_dropped: int = 0,
    ) -> None:
        group = degree + 1 if degree else len(tasks)
        if not group < 2 * threshold <= 2 * group or degree >= len(tasks):
            raise ConfigError(
                f"secagg threshold {threshold} for {group} silos: must be more than half "
                "of them and at most all, or a coordinator could learn both secrets of a silo"
            )
        self.degree = degree
        self.max_dropped = max_dropped
        self._commitments: dict[str, bytes] = {}
        self._contributions: dict[str, bytes] = {}
        self._neighbours: dict[str, frozenset[str]] | None = None
        self.session = session
        self.round = round
        self.tasks = dict(tasks)
        self.threshold = threshold
        self.deadline = deadline
        self._alive = alive
        self._clock = clock
        self._cond = threading.Condition()
        self._keys: dict[str, tuple[bytes, bytes]] = {}
        self._closed: set[str] = set()  # barrier steps that have closed
        self._mailbox: dict[str, dict[str, bytes]] = {}
        self._shared: set[str] = set()
        self._survivors: list[str] | None = None
        self._dropped: list[str] = []
        self._revealed: dict[str, tuple[list[_Share], list[_Share]]] = {}
        self._cancelled: str | None = None
        self._on_refused = on_refused
        self._out: dict[str, str] = {}  # refused or withdrawn silos, with the reason
        self._reports: dict[str, set[str]] = {}  # silo -> silos that found its share invalid
        self.blamed: tuple[str, ...] = ()
        """Silos whose secret could not be recovered after peers reported their shares."""

    # ---- barriers --------------------------------------------------------------------------

    def _wait(self, done: Callable[[], bool], until: float) -> None:
        while not done() and self._cancelled is None:
            remaining = until - self._clock()
            if remaining <= 0:
                return
            self._cond.wait(min(0.5, remaining))

    def _barrier(
        self, step: str, *, taken: Collection[str], among: Collection[str], what: str
    ) -> None:
        """Wait until every live silo of `among` took `step` (or the deadline); close the step.

        Raises:
            ProtocolError: The session was cancelled, or fewer than t silos took the step.
        """
        self._cond.notify_all()
        self._wait(
            lambda: step in self._closed or all(s in taken or not self._waiting(s) for s in among),
            self.deadline,
        )
        self._closed.add(step)
        self._cond.notify_all()
        if self._cancelled is not None:
            raise ProtocolError(self._cancelled)
        if len(taken) < self.threshold:
            raise ProtocolError(f"only {len(taken)} silos {what}, {self.threshold} needed")

    def _waiting(self, silo: str) -> bool:
        """Whether a barrier still waits for `silo` (connected and not out of the round)."""
        return silo not in self._out and self._alive(silo)

    def _refuse(self, silo: str, err: FedprivError) -> FedprivError:
        """Put `silo` out of the round for `err`; return `err` for the caller to raise.

        The caller does not hold the lock: the hook may take the federation's.
        """
        with self._cond:
            first = silo in self.tasks and silo not in self._out
            if first:
                self._out[silo] = str(err)
                self._cond.notify_all()
        if first:
            logger.warning(
                "secagg refused round=%d silo=%s reason=%s", self.round, silo, str(err)[:200]
            )
            if self._on_refused is not None:
                self._on_refused(silo, f"secure aggregation: {err}")
        return err

    def withdraw(self, silo: str, reason: str) -> None:
        """`silo` takes no further part (it declined): no barrier waits for it any more."""
        with self._cond:
            if silo in self.tasks and silo not in self._out:
                self._out[silo] = reason
                self._cond.notify_all()
                logger.warning(
                    "secagg withdrawn round=%d silo=%s reason=%s", self.round, silo, reason[:200]
                )

    def _check(self, silo: str, task_id: str) -> None:
        if self._cancelled is not None:
            raise ProtocolError(self._cancelled)
        if self.tasks.get(silo) != task_id:
            raise ProtocolError(f"silo {silo!r} has no secure-aggregation task {task_id!r}")

    def cancel(self, reason: str) -> None:
        """End the round's secure aggregation; waiting silos get `reason`."""
        with self._cond:
            self._cancelled = reason
            self._cond.notify_all()

    def advertise(
        self,
        silo: str,
        task_id: str,
        *,
        cipher_key: bytes,
        mask_key: bytes,
        commitment: bytes = b"",
    ) -> dict[str, tuple[bytes, bytes]]:
        """Record `silo`'s public keys; return every advertised silo's keys.

        The keys are bound to `silo`, the authenticated TLS identity of the caller,
        so no silo can advertise keys in another's name.

        A malformed key puts `silo` out of the round.

        Raises:
            InvalidPublicKey: A key is not 32 bytes, or is of small order.
            ProtocolError: Wrong task, equal keys, a second advertisement, or the
                step closed without `silo` or with fewer than t silos.
        """
        with self._cond:
            self._check(silo, task_id)
        try:
            crypto.check_public_key(cipher_key)
            crypto.check_public_key(mask_key)
            if cipher_key == mask_key:
                raise InvalidPublicKey("the cipher and mask keys must differ")
            if len(commitment) != (32 if self.degree else 0):
                raise SecAggError(
                    "a graph commitment of 32 bytes comes with the keys in a SecAgg+ round, "
                    "and none otherwise"
                )
        except SecAggError as err:
            raise self._refuse(silo, err) from None
        with self._cond:
            self._check(silo, task_id)
            if silo in self._out:
                raise ProtocolError(f"silo {silo!r} is out of this round: {self._out[silo]}")
            if "advertise" in self._closed:
                raise ProtocolError("the key advertisement step has closed")
            if silo in self._keys:
                raise ProtocolError(f"silo {silo!r} already advertised keys")
            self._keys[silo] = (cipher_key, mask_key)
            self._commitments[silo] = commitment
            self._barrier("advertise", taken=self._keys, among=self.tasks, what="advertised keys")
            return dict(sorted(self._keys.items()))

    def commitments(self) -> dict[str, bytes]:
        """Every advertised silo's graph commitment (empty without a degree)."""
        with self._cond:
            return {name: self._commitments[name] for name in sorted(self._keys)}

    def open_graph(
        self, silo: str, task_id: str, contribution: bytes
    ) -> tuple[dict[str, bytes], list[str]]:
        """Record `silo`'s opened graph contribution; return all of them and its neighbours.

        Every advertised silo must open its contribution: the graph is keyed by
        all of them, so that the coordinator cannot steer it by leaving one out.

        Raises:
            SecAggError: The contribution does not open `silo`'s commitment (it is
                out of the round).
            ProtocolError: No graph this round, wrong task, a second opening, or an
                advertised silo did not open its contribution in time.
        """
        with self._cond:
            self._check(silo, task_id)
            if not self.degree or "advertise" not in self._closed or silo not in self._keys:
                raise ProtocolError(f"silo {silo!r} has no graph contribution to open")
            if "graph" in self._closed or silo in self._contributions:
                raise ProtocolError("the graph step has closed, or this silo already opened")
            expected = self._commitments[silo]
        opened = len(contribution) == graph.CONTRIBUTION_BYTES and expected == graph.commitment(
            session=self.session, round=self.round, silo=silo, contribution=contribution
        )
        if not opened:
            raise self._refuse(
                silo, SecAggError("the graph contribution does not open its commitment")
            )
        with self._cond:
            self._check(silo, task_id)
            if "graph" in self._closed or silo in self._contributions:
                raise ProtocolError("the graph step has closed, or this silo already opened")
            self._contributions[silo] = contribution
            self._barrier("graph", taken=self._contributions, among=self._keys, what="opened")
            missing = sorted(set(self._keys) - set(self._contributions))
            if missing:
                raise ProtocolError(
                    f"silos {missing} did not open their graph contributions; the round's "
                    "graph cannot be fixed without them"
                )
            neighbours = self._graph()
            return dict(sorted(self._contributions.items())), sorted(neighbours[silo])

    def _graph(self) -> dict[str, frozenset[str]]:
        """The round's Harary graph over the advertised silos (called with the lock held)."""
        if self._neighbours is None:
            seed = graph.graph_seed(
                session=self.session, round=self.round, contributions=self._contributions
            )
            self._neighbours = graph.harary_neighbours(
                sorted(self._keys), degree=self.degree, seed=seed
            )
        return self._neighbours

    def _neighbourhood(self, silo: str) -> set[str]:
        """The silos holding shares of `silo`'s secrets: its neighbours and itself."""
        if not self.degree:
            return set(self._keys)
        return set(self._graph()[silo]) | {silo}

    def share(self, silo: str, task_id: str, shares: Mapping[str, bytes]) -> dict[str, bytes]:
        """Relay `silo`'s encrypted shares; return those addressed to it.

        Shares addressed to other silos than exactly every other advertised one, or
        too long, put `silo` out of the round.

        Raises:
            SecAggError: The shares are not exactly one per other advertised silo.
            ProtocolError: Wrong task, `silo` did not advertise, or fewer than t
                silos shared.
        """
        with self._cond:
            self._check(silo, task_id)
            if silo not in self._keys or "advertise" not in self._closed or silo in self._out:
                raise ProtocolError(f"silo {silo!r} did not take part in key advertisement")
            if self.degree and self._neighbours is None:
                raise ProtocolError("the round's graph is not fixed yet")
            if "share" in self._closed or silo in self._shared:
                raise ProtocolError("the share step has closed, or this silo already shared")
            expected = self._neighbourhood(silo) - {silo}
            problem = None
            if set(shares) != expected:
                problem = (
                    f"shares must be addressed to exactly {sorted(expected)}; got {sorted(shares)}"
                )
            elif any(len(c) > _MAX_CIPHERTEXT for c in shares.values()):
                problem = f"a share ciphertext is longer than {_MAX_CIPHERTEXT} bytes"
        if problem is not None:
            raise self._refuse(silo, SecAggError(problem))
        with self._cond:
            self._check(silo, task_id)
            if "share" in self._closed or silo in self._shared:
                raise ProtocolError("the share step has closed, or this silo already shared")
            for recipient, ciphertext in shares.items():
                self._mailbox.setdefault(recipient, {})[silo] = ciphertext
            self._shared.add(silo)
            self._barrier("share", taken=self._shared, among=self._keys, what="shared keys")
            mailbox = self._mailbox.get(silo, {})
            return {sender: mailbox[sender] for sender in sorted(self._shared) if sender in mailbox}

    def may_upload(self, silo: str) -> bool:
        """Whether `silo` shared keys (only then can its masks be removed)."""
        with self._cond:
            return "share" in self._closed and silo in self._shared

    def set_roster(self, survivors: Sequence[str]) -> None:
        """Name the silos whose masked updates are in the sum; wakes roster calls."""
        with self._cond:
            self._survivors = sorted(survivors)
            self._dropped = sorted(self._shared - set(survivors))
            self._cond.notify_all()

    def roster(self, silo: str, task_id: str, *, until: float) -> tuple[list[str], list[str]]:
        """Wait for the roster; return (survivors, dropped).

        Raises:
            ProtocolError: Wrong task, or no roster by `until`.
        """
        with self._cond:
            self._check(silo, task_id)
            self._wait(lambda: self._survivors is not None, until)
            if self._cancelled is not None:
                raise ProtocolError(self._cancelled)
            if self._survivors is None:
                raise ProtocolError("the round's updates were not summed in time")
            return list(self._survivors), list(self._dropped)

    def unmask(
        self,
        silo: str,
        task_id: str,
        *,
        self_mask: Sequence[tuple[str, int, bytes]],
        mask_key: Sequence[tuple[str, int, bytes]],
    ) -> None:
        """Record `silo`'s revealed shares.

        A silo leaves out the shares of the silos whose ciphertexts did not
        authenticate for it (never its own seed share); each omission is logged
        as its report against that silo.

        Raises:
            ProtocolError: `silo` is not a survivor, answered twice, or the shares
                name a silo twice, a seed of a silo that is no survivor, a key of a
                silo that did not drop, or leave out its own seed.
        """
        with self._cond:
            self._check(silo, task_id)
            if self._survivors is None or silo not in self._survivors:
                raise ProtocolError(f"silo {silo!r} is not a survivor of this round")
            if silo in self._revealed:
                raise ProtocolError(f"silo {silo!r} already revealed its shares")
            seed_owners = [s for s, _, _ in self_mask]
            key_owners = [s for s, _, _ in mask_key]
            if len(set(seed_owners)) != len(seed_owners) or len(set(key_owners)) != len(key_owners):
                raise ProtocolError("revealed shares name a silo twice")
            if not set(seed_owners) <= set(self._survivors) or silo not in seed_owners:
                raise ProtocolError(
                    "self-mask shares must be of survivors only, this silo's own among them"
                )
            if not set(key_owners) <= set(self._dropped):
                raise ProtocolError("mask-key shares must be of dropped silos only")
            # A silo holds shares of its neighbourhood only (everyone's without a graph).
            held = self._neighbourhood(silo)
            if not set(seed_owners) | set(key_owners) <= held:
                raise ProtocolError("revealed shares name silos outside this silo's neighbourhood")
            if any(len(y) != shamir.SHARE_BYTES for _, _, y in [*self_mask, *mask_key]):
                raise ProtocolError(f"each share must be {shamir.SHARE_BYTES} bytes")
            # Every share a silo holds is at its own position in the advertised roster.
            position = sorted(self._keys).index(silo) + 1
            if any(x != position for _, x, _ in [*self_mask, *mask_key]):
                raise ProtocolError(f"silo {silo!r} holds shares at position {position} only")
            omitted = ((set(self._survivors) - set(seed_owners)) & held) | (
                (set(self._dropped) - set(key_owners)) & held
            )
            for owner in sorted(omitted):
                self._reports.setdefault(owner, set()).add(silo)
                logger.warning(
                    "secagg share report round=%d silo=%s invalid_share_from=%s",
                    self.round,
                    silo,
                    owner,
                )
            self._revealed[silo] = (list(self_mask), list(mask_key))
            self._cond.notify_all()

    def wait_for_shares(self, *, until: float) -> int:
        """Wait until every live survivor revealed its shares (or `until`); return how many did."""
        with self._cond:
            assert self._survivors is not None  # set_roster ran
            survivors = self._survivors
            self._wait(
                lambda: all(s in self._revealed or not self._waiting(s) for s in survivors),
                until,
            )
            return len(self._revealed)

    # ---- unmasking -------------------------------------------------------------------------

    def _recover(self, owner: str, which: int) -> bytes:
        shares = []
        for seeds, keys in self._revealed.values():
            for name, x, y in (seeds, keys)[which]:
                if name == owner:
                    shares.append((x, y))
        try:
            return shamir.combine(shares, threshold=self.threshold)
        except ValueError as err:
            reporters = sorted(self._reports.get(owner, ()))
            why = ""
            if reporters:
                why = f"; its shares did not authenticate at {reporters}"
                self.blamed = (*self.blamed, owner)
            raise RoundFailed(
                f"cannot recover the secret of silo {owner!r}: {err}{why}; no model is published"
            ) from err

    def unmask_sum(self, total: npt.NDArray[np.uint32]) -> None:
        """Remove every mask from the ring sum `total`, in place.

        Raises:
            RoundFailed: Fewer than t silos revealed shares, or a secret cannot be
                recovered or used.
        """
        with self._cond:
            if self._survivors is None:
                raise RoundFailed("no roster: the round's updates were never summed")
            survivors, dropped = list(self._survivors), list(self._dropped)
            missing = len(self._keys) - len(survivors)
            if self.degree and missing > self.max_dropped:
                raise RoundFailed(
                    f"{missing} of the {len(self._keys)} silos in the graph are not survivors; "
                    f"it is planned for at most {self.max_dropped}; no model is published"
                )
            if len(self._revealed) < self.threshold:
                raise RoundFailed(
                    f"only {len(self._revealed)} silos revealed shares, {self.threshold} needed"
                )
            seeds = [self._recover(s, 0) for s in survivors]
            pairwise: list[tuple[bytes, bool]] = []
            for gone in dropped:
                held = sorted(set(survivors) & self._neighbourhood(gone) - {gone})
                try:
                    pairwise += crypto.masks_left_by(
                        gone,
                        self._recover(gone, 1),
                        {alive: self._keys[alive][1] for alive in held},
                        session=self.session,
                        round=self.round,
                    )
                except SecAggError as err:
                    raise RoundFailed(
                        f"the pairwise masks of silo {gone!r}: {err}; no model is published"
                    ) from err
        # Survivors' self masks and the dropped silos' pairwise masks, removed in parallel
        # slices straight from the keystreams (see fedpriv.secagg.fused).
        apply_masks(total, [(seed, True) for seed in seeds] + pairwise, sign=-1)
