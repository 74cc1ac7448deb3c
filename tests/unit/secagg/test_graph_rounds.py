"""SecAgg+ rounds over a sparse graph, end to end in one process (barriers in threads)."""

from __future__ import annotations

import secrets
import threading
import time

import numpy as np
import pytest

from fedpriv.errors import ProtocolError, RoundFailed
from fedpriv.secagg import ClientSession, RingCodec, ServerSession, graph

SIZE = 2000


def run_graph_round(n, *, dropout, drop_after_sharing=(), round=1):
    """n silos over the graph `graph.plan` picks for `dropout`; some drop after sharing.

    Returns the unmasked ring total, the exact ring sum of the survivors' encoded
    updates, the plan and every silo's reveal outcome.
    """
    plan = graph.plan(silos=n, dropout=dropout, colluders=1)
    assert plan is not None and not plan.complete
    names = [f"silo-{i:02d}" for i in range(n)]
    tasks = {name: f"task-{name}" for name in names}
    session_id = secrets.token_hex(16)
    gone: set[str] = set()
    server = ServerSession(
        session=session_id,
        round=round,
        tasks=tasks,
        threshold=plan.threshold,
        deadline=time.monotonic() + 60,
        alive=lambda s: s not in gone,
        degree=plan.degree,
        max_dropped=plan.dropped,
    )
    codec = RingCodec.plan(clip_norm=10.0, size=SIZE, clients=n, threshold=plan.min_survivors)
    rng = np.random.default_rng(round)
    updates = {name: rng.normal(0, 0.05, SIZE) for name in names}
    encoded: dict[str, np.ndarray] = {}
    total = np.zeros(SIZE, np.uint32)
    lock = threading.Lock()
    uploaded = threading.Semaphore(0)
    outcomes: dict[str, str] = {}

    def silo(name):
        session = ClientSession(
            silo=name,
            session=session_id,
            round=round,
            threshold=plan.threshold,
            degree=plan.degree,
            max_dropped=plan.dropped,
        )
        cipher, mask = session.advertise()
        peers = server.advertise(
            name, tasks[name], cipher_key=cipher, mask_key=mask, commitment=session.commitment
        )
        session.set_peers(peers, server.commitments())
        contributions, neighbours = server.open_graph(
            name, tasks[name], session.open_contribution()
        )
        session.set_graph(contributions, neighbours)
        session.receive(server.share(name, tasks[name], session.share()))
        if name in drop_after_sharing:
            gone.add(name)
            uploaded.release()
            return
        ring, _ = codec.encode(updates[name], rng=np.random.default_rng())
        encoded[name] = ring.copy()
        session.mask(ring)
        with lock:
            total[...] += ring
        uploaded.release()
        survivors, dropped = server.roster(name, tasks[name], until=time.monotonic() + 60)
        try:
            seeds, keys = session.reveal(survivors=survivors, dropped=dropped)
        except ProtocolError as err:
            outcomes[name] = str(err)
            gone.add(name)
            return
        server.unmask(name, tasks[name], self_mask=seeds, mask_key=keys)
        outcomes[name] = "revealed"

    threads = [threading.Thread(target=silo, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for _ in range(n):
        assert uploaded.acquire(timeout=60)
    server.set_roster([s for s in names if s not in drop_after_sharing])
    for t in threads:
        t.join(60)
    server.wait_for_shares(until=time.monotonic() + 5)
    exact = np.zeros(SIZE, np.uint32)
    for ring in encoded.values():
        exact += ring
    return server, total, exact, plan, outcomes


@pytest.mark.parametrize("round", [1, 2, 3])
def test_with_a_fifth_of_32_silos_dropping_after_sharing_every_round_unmasks_exactly(round):
    # Arrange: 20% of 32 is 6 silos; a different six each round
    rng = np.random.default_rng(round)
    dropped = {f"silo-{i:02d}" for i in rng.choice(32, size=6, replace=False)}
    # Act
    server, total, exact, plan, outcomes = run_graph_round(
        32, dropout=0.2, drop_after_sharing=dropped, round=round
    )
    server.unmask_sum(total)
    # Assert: a sparse graph, every survivor revealed, and the ring sum is exact
    assert plan.degree < 31 and plan.dropped == 6
    assert set(outcomes.values()) == {"revealed"} and len(outcomes) == 26
    np.testing.assert_array_equal(total, exact)


def test_more_dropouts_than_the_plan_allows_fail_the_round_with_no_sum():
    # Arrange: the plan for 32 silos at 20% tolerates 6; seven drop after sharing
    dropped = {f"silo-{i:02d}" for i in range(7)}
    # Act
    server, total, _, plan, outcomes = run_graph_round(32, dropout=0.2, drop_after_sharing=dropped)
    # Assert: no silo reveals a share, and the coordinator refuses to unmask
    assert plan.dropped == 6
    assert len(outcomes) == 25
    assert all("reveals nothing" in text for text in outcomes.values())
    with pytest.raises(RoundFailed, match="7 of the 32 silos .* at most 6; no model is published"):
        server.unmask_sum(total)


def graph_sessions(names, *, threshold, degree, max_dropped=0, **assumption):
    """A session per silo, driven in-process through keys and the jointly fixed graph.

    Returns the sessions and the graph (neighbours by silo); shares are not yet made.
    """
    group = {
        name: ClientSession(
            silo=name,
            session="s",
            round=1,
            threshold=threshold,
            degree=degree,
            max_dropped=max_dropped,
            **assumption,
        )
        for name in names
    }
    keys = {name: session.advertise() for name, session in group.items()}
    commitments = {name: session.commitment for name, session in group.items()}
    for session in group.values():
        session.set_peers(keys, commitments)
    opened = {name: session.open_contribution() for name, session in group.items()}
    seed = graph.graph_seed(session="s", round=1, contributions=opened)
    fixed = graph.harary_neighbours(sorted(names), degree=degree, seed=seed)
    for name, session in group.items():
        session.set_graph(opened, sorted(fixed[name]))
    return group, fixed


def test_each_silo_sends_shares_to_its_neighbours_only():
    # Arrange
    plan = graph.plan(silos=16, dropout=0.2, colluders=1)
    assert plan is not None
    names = [f"s{i}" for i in range(16)]
    group, fixed = graph_sessions(
        names, threshold=plan.threshold, degree=plan.degree, max_dropped=plan.dropped
    )
    # Act
    shares = {name: session.share() for name, session in group.items()}
    # Assert: k ciphertexts per silo, one per neighbour, and the graph is k-regular
    for name in names:
        assert set(shares[name]) == fixed[name]
        assert len(fixed[name]) == plan.degree
        assert all(name in fixed[peer] for peer in fixed[name])
