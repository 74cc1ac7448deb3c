"""A silo judges the SecAgg+ graph a coordinator announces against its own assumption.

The coordinator picks k and t from settings the silos cannot see. A coordinator
that announces a graph sparser than the silos would accept (here a cycle, k = 2,
t = 2, for 24 silos) leaves each silo's update protected by two neighbours:
the order is jointly random, so the coordinator cannot pick who they are, but
with two silos colluding some silo is exposed whenever they are its two
neighbours (about 9% of orders at n = 24). The union bound the silos compute
also counts the two colluders cutting the cycle in two, and caps at 1.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedpriv.coordinator import SecAggConfig
from fedpriv.errors import SecAggError
from fedpriv.secagg import ClientSession, RingCodec, graph, shamir
from fedpriv.secagg.fused import apply_masks
from tests.unit.secagg.test_graph_rounds import graph_sessions

N = 24
NAMES = [f"silo-{i:02d}" for i in range(N)]


def cycle_round(*, security_bits: int | None = None):
    """Every silo of a round whose coordinator announced a cycle, up to received shares."""
    extra = {} if security_bits is None else {"security_bits": security_bits}
    group, fixed = graph_sessions(NAMES, threshold=2, degree=2, **extra)
    sent = {name: session.share() for name, session in group.items()}
    for name, session in group.items():
        session.receive({sender: out[name] for sender, out in sent.items() if name in out})
    return group, fixed


def test_the_attack_two_colluding_neighbours_expose_a_silos_update_in_an_accepted_cycle():
    # Arrange: silos that accept any graph (2^-0), as they did before they judged it
    group, fixed = cycle_round(security_bits=0)
    target = NAMES[0]
    colluders = sorted(fixed[target])
    codec = RingCodec.plan(clip_norm=10.0, size=1000, clients=N, threshold=2)
    encoded, _ = codec.encode(
        np.random.default_rng(1).normal(0, 0.1, 1000), rng=np.random.default_rng()
    )
    encoded = encoded.copy()
    upload = encoded.copy()
    group[target].mask(upload)
    # Act: the coordinator takes the target's self-seed shares from the colluders'
    # ordinary reveals (every survivor's seed is recovered in any round), and the
    # colluders hand over the pairwise seeds they share with the target.
    shares = [
        (x, y)
        for colluder in colluders
        for name, x, y in group[colluder].reveal(survivors=NAMES, dropped=[])[0]
        if name == target
    ]
    self_seed = shamir.combine(shares, threshold=2)
    pairwise = [(group[c]._derived[target][2], target < c) for c in colluders]
    apply_masks(upload, [(self_seed, True), *pairwise], sign=-1)
    # Assert: the target's own update, exactly
    np.testing.assert_array_equal(upload, encoded)


def test_silos_refuse_the_cycle_before_any_share_leaves():
    # With ceil(5% of 24) = 2 colluders assumed, the cycle's bound is 1 > 2^-40
    with pytest.raises(
        SecAggError, match=r"the announced graph \(24 silos, k=2, t=2.*if 2 silos collude"
    ):
        cycle_round()


def test_a_silo_that_assumes_fewer_colluders_accepts_the_cycle():
    session = ClientSession(
        silo=NAMES[0], session="s", round=1, threshold=2, degree=2, corrupt_fraction=0.0
    )
    others = [ClientSession(silo=n, session="s", round=1, threshold=2, degree=2) for n in NAMES]
    keys = {s.silo: s.advertise() for s in others}
    commitments = {s.silo: s.commitment for s in others}
    keys[NAMES[0]], commitments[NAMES[0]] = session.advertise(), session.commitment
    session.set_peers(keys, commitments)  # no refusal
    assert session.open_contribution()


def test_every_graph_the_default_settings_plan_is_accepted_down_to_k_plus_one_silos():
    # A silo never refuses the coordinator's default plan, even when fewer silos
    # than it was planned for advertise keys.
    sparse = 0
    for silos in range(3, 201):
        plan = SecAggConfig().graph_for(silos)
        if plan.complete:
            continue
        sparse += 1
        for listed in range(plan.degree + 1, silos + 1):
            refused = graph.refusal(
                silos=listed, degree=plan.degree, threshold=plan.threshold, max_dropped=plan.dropped
            )
            assert refused is None, (silos, listed, refused)
    assert sparse > 150  # the sparse graph is the default from about 14 silos on
