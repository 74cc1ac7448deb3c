"""Krum, median and trimmed mean over real spool files: robust to a poisoned update,
equal to Flower's rules on the same updates, and read in slices, never whole models."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import parameters_to_ndarrays
from flwr.server import strategy as flower

from fedpriv.errors import ConfigError, RoundFailed
from fedpriv.strategy import FedAvg, Krum, Median, SpooledUpdate, TrimmedMean
from fedpriv.strategy.protocol import WholeUpdateStrategy
from fedpriv.wire import Model
from tests.unit.strategy.spooling import flower_results, update_sum

HONEST = 4
WEIGHTS = [10, 20, 30, 40, 50]


def arrays(rng, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "w": (rng.normal(size=(40, 30)) * scale).astype(np.float32),
        "b": (rng.normal(size=30) * scale).astype(np.float32),
        "d": rng.normal(size=7) * scale,
    }


def honest_and_poisoned(seed: int = 0) -> tuple[Model, list[Model]]:
    """The base, then four honest silos near it and one that sends 100 times an honest update."""
    rng = np.random.default_rng(seed)
    base = Model.from_arrays(arrays(rng), chunk_bytes=256)
    models = []
    for _ in range(HONEST):
        drift = arrays(rng, scale=0.05)
        models.append(
            Model.from_arrays(
                {k: (v + drift[k]).astype(v.dtype) for k, v in base.arrays().items()},
                layout=base.layout,
            )
        )
    poisoned = {k: (v * 100).astype(v.dtype) for k, v in models[0].arrays().items()}
    models.insert(2, Model.from_arrays(poisoned, layout=base.layout))
    return base, models


def distance(a: Model, b: Model) -> float:
    return float(
        np.sqrt(
            sum(
                np.sum((x.astype(np.float64) - y.astype(np.float64)) ** 2)
                for x, y in zip(a.arrays().values(), b.arrays().values(), strict=True)
            )
        )
    )


def honest_mean(models: list[Model]) -> Model:
    honest = [m for i, m in enumerate(models) if i != 2]
    return FedAvg().aggregate(1, base=honest[0], total=update_sum(honest, [1] * HONEST))


RULES = [
    Krum(byzantine=1),
    Krum(byzantine=1, keep=2),
    Median(),
    TrimmedMean(beta=0.2),
    Median(slice_bytes=64),  # slices of 8 elements: many slices per tensor
    TrimmedMean(beta=0.2, slice_bytes=8),  # one element at a time
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.name}-{r._elements}")
def test_one_poisoned_update_moves_the_robust_rules_but_little(rule, spools):
    # Arrange
    base, models = honest_and_poisoned()
    updates = spools.updates(models, WEIGHTS)
    target = honest_mean(models)
    spread = max(distance(m, target) for i, m in enumerate(models) if i != 2)
    assert isinstance(rule, WholeUpdateStrategy)
    assert rule.configure(1) == {}
    assert not rule.supports_secure_aggregation
    # Act
    robust = rule.aggregate_updates(1, base=base, updates=updates)
    mean = FedAvg().aggregate(1, base=base, total=update_sum(models, WEIGHTS))
    # Assert: within the honest updates' own spread of their mean; FedAvg's mean is
    # thrown far past it (the poisoned model is 100 times a model of norm ~40).
    assert distance(robust, target) <= spread
    assert distance(mean, target) > 100 * spread
    assert [a.dtype for a in robust.arrays().values()] == [np.float32, np.float32, np.float64]


def flower_model(reference, models: list[Model]) -> list[np.ndarray]:
    parameters, _ = reference.aggregate_fit(1, flower_results(models, WEIGHTS), [])
    return parameters_to_ndarrays(parameters)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (Krum(byzantine=1), flower.Krum(num_malicious_clients=1)),
        (Krum(byzantine=1), flower.Krum(num_malicious_clients=1, num_clients_to_keep=1)),
        (Krum(byzantine=1, keep=3), flower.Krum(num_malicious_clients=1, num_clients_to_keep=3)),
        (Krum(byzantine=0, keep=4), flower.Krum(num_malicious_clients=0, num_clients_to_keep=4)),
        (Median(slice_bytes=96), flower.FedMedian()),
        (TrimmedMean(beta=0.2, slice_bytes=96), flower.FedTrimmedAvg(beta=0.2)),
        (TrimmedMean(beta=0.4), flower.FedTrimmedAvg(beta=0.4)),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_rules_agree_with_flowers(ours, theirs, seed, spools):
    base, models = honest_and_poisoned(seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(models))  # the poisoned one anywhere
    models = [models[i] for i in order]
    got = ours.aggregate_updates(1, base=base, updates=spools.updates(models, WEIGHTS))
    want = flower_model(theirs, models)
    for name, a, b in zip(got.layout.specs, got.arrays().values(), want, strict=True):
        assert a.dtype == b.dtype, name
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=name.name)


def test_krum_returns_the_chosen_update_byte_for_byte(spools):
    base, models = honest_and_poisoned()
    rule = Krum(byzantine=1, slice_bytes=40)  # 5 elements per read: reads cross tensors
    updates = spools.updates(models, WEIGHTS)
    chosen = int(np.argmin(rule.scores(base, updates)))
    assert chosen != 2
    got = rule.aggregate_updates(1, base=base, updates=updates)
    assert got.payload.tobytes() == models[chosen].payload.tobytes()


def test_krum_scores_are_sums_of_squared_distances_to_the_nearest_peers(spools):
    vectors = [np.array([0.0, 0.0]), np.array([1.0, 0.0]), np.array([0.0, 2.0]), [10.0, 10.0]]
    models = [Model.from_arrays({"x": np.asarray(v)}) for v in vectors]
    scores = Krum(byzantine=0).scores(models[0], spools.updates(models))
    # Squared distances: 01 = 1, 02 = 4, 12 = 5, 03 = 200, 13 = 181, 23 = 164;
    # each score sums the N - f - 2 = 2 smallest of a row.
    np.testing.assert_allclose(scores, [1 + 4, 1 + 5, 4 + 5, 164 + 181])


class RecordingUpdate(SpooledUpdate):
    """A spooled update that records the length of every read."""

    def __init__(self, inner: SpooledUpdate, reads: list[int]) -> None:
        super().__init__(silo=inner.silo, weight=inner.weight, layout=inner.layout, fd=inner._fd)
        self.reads = reads

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append(length)
        return super().read(offset, length)


@pytest.mark.parametrize(
    "rule",
    [
        Krum(byzantine=1, slice_bytes=256),
        Krum(byzantine=1, keep=2, slice_bytes=256),
        Median(slice_bytes=256),
        TrimmedMean(beta=0.2, slice_bytes=256),
    ],
    ids=lambda r: r.name,
)
def test_updates_are_read_in_slices_never_whole(rule, spools):
    base, models = honest_and_poisoned()
    reads: list[int] = []
    updates = [RecordingUpdate(u, reads) for u in spools.updates(models, WEIGHTS)]
    rule.aggregate_updates(1, base=base, updates=updates)
    # 256 float64 bytes = 32 elements: 128 bytes of a float32 tensor, 256 of a float64 one.
    assert max(reads) <= 256 < base.layout.payload_bytes
    assert sum(reads) >= len(models) * base.layout.payload_bytes  # everything was read


def test_krum_refuses_too_few_updates_for_its_byzantine_count(spools):
    base, models = honest_and_poisoned()
    updates = spools.updates(models, WEIGHTS)
    with pytest.raises(ConfigError, match=r"more than 6 updates \(N > 2f \+ 2\), got 5"):
        Krum(byzantine=2).aggregate_updates(1, base=base, updates=updates)
    with pytest.raises(ConfigError, match="keep <= N - f = 4"):
        Krum(byzantine=1, keep=5).aggregate_updates(1, base=base, updates=updates)


def test_trimmed_mean_refuses_to_trim_nothing(spools):
    base, models = honest_and_poisoned()
    rule = TrimmedMean(beta=0.2)
    with pytest.raises(ConfigError, match="trims nothing from 4 updates.*at least 5 updates"):
        rule.aggregate_updates(1, base=base, updates=spools.updates(models[:4]))
    assert rule.trimmed(5) == 1 and rule.trimmed(10) == 2
    with pytest.raises(ConfigError, match="at least 4 updates"):
        TrimmedMean(beta=0.3).trimmed(3)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Krum(byzantine=-1), "byzantine = -1"),
        (lambda: Krum(byzantine=True), "byzantine = True"),
        (lambda: Krum(byzantine=1, keep=0), "keep = 0"),
        (lambda: Krum(byzantine=1, slice_bytes=4), "slice_bytes = 4"),
        (lambda: Median(slice_bytes=2.5), "slice_bytes = 2.5"),
        (lambda: TrimmedMean(beta=0.5), r"beta = 0.5: must be in \(0, 0.5\)"),
        (lambda: TrimmedMean(beta=0), "beta = 0"),
        (lambda: TrimmedMean(beta="0.2"), "beta = '0.2'"),
    ],
)
def test_bad_parameters_are_config_errors(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_no_updates_or_a_foreign_layout_fail_the_round(spools):
    base, models = honest_and_poisoned()
    other = Model.from_arrays({"w": np.zeros(3, np.float32)})
    for rule in (Krum(byzantine=0), Median(), TrimmedMean(beta=0.2)):
        with pytest.raises(RoundFailed, match="no complete update"):
            rule.aggregate_updates(1, base=base, updates=[])
        updates = spools.updates([*models[:4], other])
        with pytest.raises(RoundFailed, match="silo-4"):
            rule.aggregate_updates(1, base=base, updates=updates)


def test_integer_and_bool_tensors_are_rounded_back(spools):
    models = [
        Model.from_arrays({"n": np.array([v, 2 * v], np.int64), "m": np.array([v > 2])})
        for v in (1, 2, 3, 4, 100)
    ]
    median = Median().aggregate_updates(1, base=models[0], updates=spools.updates(models))
    assert median.arrays()["n"].tolist() == [3, 6]
    assert median.arrays()["m"].tolist() == [True]
    trimmed = TrimmedMean(beta=0.2).aggregate_updates(
        1, base=models[0], updates=spools.updates(models)
    )
    assert trimmed.arrays()["n"].tolist() == [3, 6]
