"""What a coordinator that deviates from the protocol can still learn: the documented limit.

docs/secure-aggregation.md gives the guarantee for an honest-but-curious
coordinator only, and names the roster attacks that break it (there is no
consistency round and keys are not signed). These tests run those attacks
through real `ClientSession` objects, each silo answering one reveal request as
its code allows, and recover one silo's masked upload exactly. They state the
limit as computed fact: a consistency round (Bonawitz et al. §6) must make them
fail, and the docs must change with them.

The control: the same reveals under one roster for everybody leave the target's
upload masked.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import pytest

from fedpriv.secagg import ClientSession, RingCodec, crypto, graph, shamir
from fedpriv.secagg.fused import apply_masks

SESSION, ROUND, SIZE = "s", 1, 1000


def _round(n: int, k: int, t: int, max_dropped: int):
    """Keys, graph and shares of `n` honest silos, up to the reveal step."""
    names = [f"silo-{i:03d}" for i in range(n)]
    group = {
        s: ClientSession(
            silo=s, session=SESSION, round=ROUND, threshold=t, degree=k, max_dropped=max_dropped
        )
        for s in names
    }
    keys = {s: g.advertise() for s, g in group.items()}
    commitments = {s: g.commitment for s, g in group.items()}
    for g in group.values():
        g.set_peers(keys, commitments)  # each silo's own acceptance check runs here
    opened = {s: g.open_contribution() for s, g in group.items()}
    seed = graph.graph_seed(session=SESSION, round=ROUND, contributions=opened)
    neighbours = graph.harary_neighbours(names, degree=k, seed=seed)
    for s, g in group.items():
        g.set_graph(opened, sorted(neighbours[s]))
    sent = {s: g.share() for s, g in group.items()}
    for s, g in group.items():
        g.receive({a: out[s] for a, out in sent.items() if s in out})
    return names, group, neighbours, keys


def _upload(group: dict[str, ClientSession], target: str) -> tuple[np.ndarray, np.ndarray]:
    """The target's encoded update and what it uploads (the same, masked)."""
    codec = RingCodec(clip_norm=10.0, scale=1e6, size=SIZE)
    update = np.random.default_rng(7).normal(0, 0.1, SIZE)
    plain, _ = codec.encode(update, rng=np.random.default_rng(1))
    masked = plain.copy()
    group[target].mask(masked)
    return plain.copy(), masked


def _unmask_alone(masked, target, seed, mask_keys: dict[str, bytes], keys) -> np.ndarray:
    """Remove the target's self mask and, from each peer's private mask key, the pair mask."""
    masks: list[tuple[bytes, bool]] = [(seed, True)]
    for peer, private in mask_keys.items():
        masks += crypto.masks_left_by(
            peer, private, {target: keys[target][1]}, session=SESSION, round=ROUND
        )
    out = masked.copy()
    apply_masks(out, masks, sign=-1)
    return out


def _shares_of(reveal, target: str) -> tuple[list, dict[str, list]]:
    seeds, mask_keys = reveal
    return [(i, y) for s, i, y in seeds if s == target], {s: [(i, y)] for s, i, y in mask_keys}


def _neighbours_told_dropped(names, group, target, told: Collection[str]):
    """Every silo answers one reveal: all alive but the target's neighbours other than itself."""
    seed_shares: list = []
    key_shares: dict[str, list] = {v: [] for v in told}
    for w in names:
        dropped = sorted(set(told) - {w})
        alive = [s for s in names if s not in dropped]
        seeds, keys = _shares_of(group[w].reveal(survivors=alive, dropped=dropped), target)
        seed_shares += seeds
        for peer, shares in keys.items():
            key_shares[peer] += shares
    return seed_shares, key_shares


def test_split_rosters_unmask_a_silo_with_no_colluder_in_a_secagg_plus_graph():
    n, k, t = 100, 20, 11
    max_dropped = k  # announced by the coordinator; each silo's own check accepts it
    assert graph.refusal(silos=n, degree=k, threshold=t, max_dropped=max_dropped) is None
    names, group, neighbours, keys = _round(n, k, t, max_dropped)
    target = names[0]
    plain, masked = _upload(group, target)
    # The target's neighbours each hear that the target survived and the other neighbours dropped.
    seeds, key_shares = _neighbours_told_dropped(names, group, target, neighbours[target])
    seed = shamir.combine(seeds, threshold=t)
    private = {peer: shamir.combine(shares, threshold=t) for peer, shares in key_shares.items()}
    assert np.array_equal(_unmask_alone(masked, target, seed, private, keys), plain)


def test_split_rosters_and_one_colluding_neighbour_unmask_a_silo_under_the_default_plan():
    n = 16
    plan = graph.plan(silos=n, dropout=0.1, colluders=1)
    k, t, max_dropped = plan.degree, plan.threshold, plan.dropped
    assert graph.refusal(silos=n, degree=k, threshold=t, max_dropped=max_dropped) is None
    names, group, neighbours, keys = _round(n, k, t, max_dropped)
    target = names[0]
    colluder, *honest = sorted(neighbours[target])
    plain, masked = _upload(group, target)
    # The colluder hands over both shares it holds of the target's secrets (its own memory).
    index, seed_y, key_y = group[colluder]._held[target]
    seeds, key_shares = [(index, seed_y)], [(index, key_y)]
    told_dropped = set(honest[t - 2 :])  # these hear the target dropped: they reveal its key
    for w in names:
        if w == colluder:
            continue
        dropped = [target] if w in told_dropped else []
        alive = [s for s in names if s not in dropped]
        reveal = group[w].reveal(survivors=alive, dropped=dropped)
        seeds += [(i, y) for s, i, y in reveal[0] if s == target]
        key_shares += [(i, y) for s, i, y in reveal[1] if s == target]
    seed = shamir.combine(seeds[:t], threshold=t)
    private = crypto.KeyPair.from_private_bytes(shamir.combine(key_shares[:t], threshold=t))
    masks = [(seed, True)] + [
        (
            crypto.pairwise_mask_seed(
                private, keys[v][1], session=SESSION, round=ROUND, silos=(target, v)
            ),
            target < v,
        )
        for v in neighbours[target]
    ]
    unmasked = masked.copy()
    apply_masks(unmasked, masks, sign=-1)
    assert np.array_equal(unmasked, plain)


def test_one_roster_for_everybody_leaves_the_target_masked():
    n, k, t = 100, 20, 11
    names, group, neighbours, keys = _round(n, k, t, k)
    target = names[0]
    plain, masked = _upload(group, target)
    ring = sorted(neighbours[target])
    # Who holds a share of the target's secrets: its neighbours, and the target itself.
    holders = [s for s in names if target in group[s]._held or s == target]
    assert set(holders) == {*ring, target}
    # Drop all but t holders: they reveal the target's seed, and keep their pair masks on.
    told = ring[: len(holders) - t]
    alive = [s for s in names if s not in told]
    seeds, key_shares = [], {v: [] for v in told}
    for w in alive:
        revealed_seeds, revealed_keys = _shares_of(
            group[w].reveal(survivors=alive, dropped=told), target
        )
        seeds += revealed_seeds
        for peer, shares in revealed_keys.items():
            key_shares[peer] += shares
    assert len(seeds) == t
    seed = shamir.combine(seeds, threshold=t)
    private = {
        peer: shamir.combine(shares, threshold=t)
        for peer, shares in key_shares.items()
        if len(shares) >= t
    }
    assert not np.array_equal(_unmask_alone(masked, target, seed, private, keys), plain)
    # Drop one more and too few silos hold the target's seed to reveal it at all.
    fewer = [
        (group[s]._own if s == target else group[s]._held[target])[:2]
        for s in holders
        if s not in ring[: len(holders) - t + 1]
    ]
    with pytest.raises(ValueError, match=f"{t - 1} shares, {t} needed"):
        shamir.combine(fewer, threshold=t)
