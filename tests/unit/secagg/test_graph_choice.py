"""Who fixes the SecAgg+ graph: the silos' committed contributions, not the coordinator.

The attack: a coordinator that picks the graph alone (as Flower's SecAgg+
workflow does, by shuffling the node list itself) can place a target silo among
colluding silos only. The colluders know every pairwise mask of the target, the
coordinator is given its self-mask seed, and the target's update is exposed.
The tests show that such a graph is easy to find by grinding, and that silos
refuse every way a coordinator could impose one.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from fedpriv.errors import ProtocolError, SecAggError
from fedpriv.secagg import ClientSession, ServerSession, graph

N, DEGREE, THRESHOLD = 16, 2, 2
NAMES = [f"silo-{i:02d}" for i in range(N)]


def advertised(session_id: str = "s"):
    group = {
        name: ClientSession(
            silo=name, session=session_id, round=1, threshold=THRESHOLD, degree=DEGREE
        )
        for name in NAMES
    }
    keys = {name: s.advertise() for name, s in group.items()}
    commitments = {name: s.commitment for name, s in group.items()}
    for session in group.values():
        session.set_peers(keys, commitments)
    opened = {name: s.open_contribution() for name, s in group.items()}
    return group, opened


def derived(opened):
    seed = graph.graph_seed(session="s", round=1, contributions=opened)
    return graph.harary_neighbours(sorted(opened), degree=DEGREE, seed=seed)


def test_a_coordinator_choosing_the_graph_alone_isolates_a_target_among_colluders():
    # Arrange: the target and two colluding silos
    target, colluders = "silo-00", {"silo-01", "silo-02"}
    # Act: grind graph seeds, as a coordinator free to pick the order could
    for attempt in itertools.count():
        seed = attempt.to_bytes(32, "big")
        if graph.harary_neighbours(NAMES, degree=DEGREE, seed=seed)[target] <= colluders:
            break
        assert attempt < 20_000
    # Assert: a graph where every neighbour of the target colludes exists and is found
    chosen = graph.harary_neighbours(NAMES, degree=DEGREE, seed=seed)
    assert chosen[target] == colluders


def test_silos_refuse_a_graph_the_coordinator_proposes_instead_of_the_derived_one():
    # Arrange: the coordinator routes silo-00's shares to its colluders instead
    group, opened = advertised()
    fixed = derived(opened)
    proposed = {"silo-01", "silo-02"}
    assert proposed != fixed["silo-00"]
    # Act / Assert
    with pytest.raises(SecAggError, match="not the one the silos' contributions fix"):
        group["silo-00"].set_graph(opened, sorted(proposed))
    # ... while the derived graph is taken
    group["silo-03"].set_graph(opened, sorted(fixed["silo-03"]))


def test_silos_refuse_a_contribution_that_does_not_open_its_commitment():
    # Arrange: the coordinator substitutes its own value for silo-05's contribution
    group, opened = advertised()
    forged = dict(opened, **{"silo-05": bytes(32)})
    # Act / Assert: the graph it would give is refused, whatever neighbours come with it
    with pytest.raises(SecAggError, match="does not open its commitment"):
        group["silo-00"].set_graph(forged, sorted(derived(forged)["silo-00"]))


def test_silos_refuse_a_contribution_list_that_leaves_a_silo_out():
    # Arrange: leaving a silo out would give the coordinator one seed per subset to choose from
    group, opened = advertised()
    fewer = {name: value for name, value in opened.items() if name != "silo-07"}
    # Act / Assert
    with pytest.raises(SecAggError, match=r"missing \['silo-07'\]"):
        group["silo-00"].set_graph(fewer, [])


def test_a_silo_refuses_its_own_contribution_changed():
    group, opened = advertised()
    changed = dict(opened, **{"silo-00": bytes(32)})
    with pytest.raises(SecAggError, match="changed this silo's graph contribution"):
        group["silo-00"].set_graph(changed, [])


def test_a_key_list_with_a_replaced_own_commitment_is_refused():
    session = ClientSession(silo="silo-00", session="s", round=1, threshold=2, degree=2)
    other = ClientSession(silo="silo-01", session="s", round=1, threshold=2, degree=2)
    third = ClientSession(silo="silo-02", session="s", round=1, threshold=2, degree=2)
    keys = {
        "silo-00": session.advertise(),
        "silo-01": other.advertise(),
        "silo-02": third.advertise(),
    }
    commitments = {"silo-00": bytes(32), "silo-01": other.commitment, "silo-02": third.commitment}
    with pytest.raises(SecAggError, match="graph commitments do not match"):
        session.set_peers(keys, commitments)


def test_a_contribution_is_not_opened_before_the_key_list_is_fixed():
    session = ClientSession(silo="silo-00", session="s", round=1, threshold=2, degree=2)
    with pytest.raises(ProtocolError, match="opens after the key list"):
        session.open_contribution()


def test_the_coordinator_refuses_a_contribution_that_does_not_open_its_commitment():
    # Arrange: a real key advertisement step, then silo-01 opens a different value
    group = {
        name: ClientSession(silo=name, session="s", round=1, threshold=THRESHOLD, degree=DEGREE)
        for name in NAMES
    }
    refused: list[str] = []
    server = ServerSession(
        session="s",
        round=1,
        tasks={name: f"t-{name}" for name in NAMES},
        threshold=THRESHOLD,
        deadline=time.monotonic() + 30,
        alive=lambda s: s not in refused,
        on_refused=lambda silo, why: refused.append(silo),
        degree=DEGREE,
    )

    def advertise(name: str) -> None:
        cipher, mask = group[name].advertise()
        server.advertise(
            name, f"t-{name}", cipher_key=cipher, mask_key=mask, commitment=group[name].commitment
        )

    threads = [threading.Thread(target=advertise, args=(name,)) for name in NAMES]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    # Act / Assert
    with pytest.raises(SecAggError, match="does not open its commitment"):
        server.open_graph("silo-01", "t-silo-01", bytes(32))
    assert refused == ["silo-01"]
