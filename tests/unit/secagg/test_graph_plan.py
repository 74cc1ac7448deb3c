"""SecAgg+ graph planning: the Harary graph, and failure bounds checked by enumeration."""

from __future__ import annotations

import itertools
import math

import pytest

from fedpriv.coordinator import SecAggConfig
from fedpriv.errors import ConfigError
from fedpriv.secagg import graph


def components(nodes: set[int], neighbours: dict[int, frozenset[int]]) -> int:
    """Connected components of the subgraph on `nodes` (an independent BFS)."""
    left, count = set(nodes), 0
    while left:
        count += 1
        frontier = [left.pop()]
        while frontier:
            for peer in neighbours[frontier.pop()] & left:
                left.discard(peer)
                frontier.append(peer)
    return count


def ring(n: int, degree: int) -> dict[int, frozenset[int]]:
    half = degree // 2
    return {i: frozenset((i + d) % n for d in range(-half, half + 1) if d) for i in range(n)}


def test_the_harary_graph_is_regular_symmetric_and_fixed_by_its_seed():
    names = [f"s{i}" for i in range(11)]
    first = graph.harary_neighbours(names, degree=4, seed=bytes(32))
    assert first == graph.harary_neighbours(list(reversed(names)), degree=4, seed=bytes(32))
    assert first != graph.harary_neighbours(names, degree=4, seed=b"\x01" * 32)
    for name, peers in first.items():
        assert len(peers) == 4 and name not in peers
        assert all(name in first[peer] for peer in peers)


@pytest.mark.parametrize("degree", [1, 3, 0, 11])
def test_an_odd_or_out_of_range_degree_is_refused(degree):
    with pytest.raises(ValueError, match="even degree"):
        graph.harary_neighbours([f"s{i}" for i in range(11)], degree=degree, seed=bytes(32))


@pytest.mark.parametrize(
    ("n", "degree", "threshold", "dropped", "colluders"),
    [(10, 2, 2, 2, 1), (10, 4, 3, 3, 0), (12, 4, 3, 3, 1), (10, 2, 2, 1, 2), (11, 6, 4, 4, 2)],
)
def test_the_failure_bounds_cover_the_exact_probabilities_by_enumeration(
    n, degree, threshold, dropped, colluders
):
    # Arrange: a uniformly random order is the same as uniformly random dropped and
    # colluding sets on a fixed ring; enumerate all of them
    neighbours = ring(n, degree)
    insecure = incorrect = cases = 0
    for gone in itertools.combinations(range(n), dropped):
        lost = False
        for silo in range(n):
            holders = (neighbours[silo] | ({silo} if silo not in gone else set())) - set(gone)
            lost |= len(holders) < threshold
        rest = [i for i in range(n) if i not in gone]
        for bad in itertools.combinations(rest, colluders):
            cases += 1
            incorrect += lost
            honest = set(rest) - set(bad)
            split = components(honest, neighbours) > 1
            stolen = any(len(neighbours[h] & set(bad)) >= threshold for h in honest)
            insecure += split or stolen
    # Act
    security = graph.security_failure(
        silos=n, degree=degree, threshold=threshold, dropped=dropped, colluders=colluders
    )
    correctness = graph.correctness_failure(
        silos=n, degree=degree, threshold=threshold, dropped=dropped
    )
    # Assert: each bound is at least the exact probability, which is not zero here
    assert insecure or incorrect
    assert insecure / cases <= security + 1e-12
    assert incorrect / cases <= correctness + 1e-12


def test_the_plan_meets_its_bounds_and_its_threshold_is_a_neighbourhood_majority():
    for n in (16, 32, 64, 100, 1000):
        plan = graph.plan(silos=n, dropout=0.1, colluders=math.ceil(0.05 * n))
        assert plan is not None
        assert plan.security <= 2.0**-40 and plan.correctness <= 2.0**-30
        assert plan.degree + 1 < 2 * plan.threshold <= 2 * (plan.degree + 1)
        assert plan.dropped == math.floor(0.1 * n)


def test_the_degree_grows_as_log_n_not_as_n():
    degrees = {
        n: graph.plan(silos=n, dropout=0.1, colluders=math.ceil(0.05 * n)).degree
        for n in (100, 1000, 10_000)
    }
    for n, degree in degrees.items():
        assert degree <= 5 * math.log2(n)
    assert degrees[10_000] < 3 * degrees[100]


def test_auto_picks_the_complete_graph_for_small_rounds_and_a_sparse_one_for_large():
    config = SecAggConfig()
    assert config.graph_for(8).complete
    assert config.graph_for(8).threshold == 5
    large = config.graph_for(100)
    assert not large.complete and large.masks_per_silo <= 50
    assert SecAggConfig(graph="complete").graph_for(100).complete
    # A fixed threshold is a complete-graph setting
    assert SecAggConfig(threshold=51).graph_for(100).complete


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"graph": "ring"}, "secagg.graph"),
        ({"graph": "harary", "threshold": 3}, "plans t per neighbourhood"),
        ({"dropout": 0.5}, "secagg.dropout"),
        ({"corrupt_fraction": -0.1}, "secagg.corrupt_fraction"),
        ({"security_bits": 0}, "secagg.security_bits"),
    ],
)
def test_graph_settings_are_validated(settings, match):
    with pytest.raises(ConfigError, match=match):
        SecAggConfig(**settings)
