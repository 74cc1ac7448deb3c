"""The adaptive-clipping count: its sensitivity to one silo, proven on neighbouring inputs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fedpriv.privacy import GaussianSteps, epsilon
from fedpriv.privacy.central import CentralDP, ClipState, secure_generator

# The digits demo's [dp] settings (examples/digits/demo.py): z = 0.02,
# clipped_count_stddev = z, adaptive, three silos (expected_clients = min_clients = 3).
DEMO = CentralDP(
    noise_multiplier=0.02,
    clip_norm=5.0,
    adaptive=True,
    clipped_count_stddev=0.02,
    expected_clients=3,
)


def neighbours(max_silos: int, *, min_silos: int = 0):
    """Every bit vector of up to `max_silos` silos, paired with each one-silo-removed neighbour.

    b = 1 means the silo's update was within the norm (unclipped).
    """
    for n in range(min_silos + 1, max_silos + 1):
        for bits in itertools.product((0, 1), repeat=n):
            for k in range(n):
                yield bits, bits[:k] + bits[k + 1 :]


def accounted_count_sensitivity(dp: CentralDP) -> float:
    """The count sensitivity s that the accounting assumes, read back from it.

    The round is accounted as one Gaussian mechanism with noise multiplier z, and
    z^-2 = z_delta^-2 + (sigma_b / s)^-2, so s = sigma_b * sqrt(z^-2 - z_delta^-2).
    """
    z, z_delta = dp.noise_multiplier, dp.update_noise_multiplier
    return dp.count_stddev * math.sqrt(z**-2 - z_delta**-2)


def test_centred_count_changes_by_exactly_the_accounted_half_when_one_silo_is_added_or_removed():
    # Arrange: every combination of clipped/unclipped bits over up to 9 silos
    changes = []
    # Act
    for bits, fewer in neighbours(9):
        before = ClipState.centred_count(unclipped=sum(bits), count=len(bits))
        after = ClipState.centred_count(unclipped=sum(fewer), count=len(fewer))
        changes.append(abs(before - after))
    # Assert: the worst case (and every case) is 1/2, which is what is accounted
    assert max(changes) == min(changes) == 0.5 == DEMO.count_sensitivity
    assert accounted_count_sensitivity(DEMO) == pytest.approx(max(changes), rel=1e-12)


def test_uncentred_count_changes_by_one_so_accounting_it_at_a_half_understates_epsilon():
    # The statistic released before: the plain count of unclipped updates.
    worst = max(abs(sum(bits) - sum(fewer)) for bits, fewer in neighbours(9))
    assert worst == 1 > accounted_count_sensitivity(DEMO)
    # At sensitivity 1 the same noise is a mechanism with a smaller noise multiplier.
    honest = (DEMO.update_noise_multiplier**-2 + (DEMO.count_stddev / worst) ** -2) ** -0.5
    steps = [GaussianSteps(noise_multiplier=honest, sample_rate=1.0, steps=5)]
    printed = [GaussianSteps(noise_multiplier=DEMO.noise_multiplier, sample_rate=1.0, steps=5)]
    assert epsilon(steps, delta=1e-5) > 1.5 * epsilon(printed, delta=1e-5)


def test_released_fraction_moves_by_the_accounted_sensitivity_over_m_and_nothing_else():
    # Arrange: the same noise draw on both neighbours (same seed), so the difference of
    # the two releases is the difference of what the noise was added to, over the divisor.
    # Every pair of neighbouring inputs (one silo added or removed) up to 7 silos.
    shifts = []
    for seed, (bits, fewer) in enumerate(neighbours(7, min_silos=1)):
        # Act
        released = [
            ClipState(DEMO).update(unclipped=sum(b), count=len(b), rng=np.random.default_rng(seed))
            for b in (bits, fewer)
        ]
        shifts.append(abs(released[0] - released[1]) * DEMO.expected_clients)
    # Assert: in the noise's own units every shift is the accounted sensitivity, so the
    # release is a Gaussian mechanism with sensitivity 1/2 and noise sigma_b (it is not
    # divided by the data-dependent true count).
    assert max(shifts) == pytest.approx(accounted_count_sensitivity(DEMO), abs=1e-12)
    assert min(shifts) == pytest.approx(accounted_count_sensitivity(DEMO), abs=1e-12)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_adaptive_norm_shrinks_when_all_are_unclipped_and_grows_when_all_are_clipped(count):
    # Whatever the round's count against expected_clients = 3, with gamma = 1/2.
    for _ in range(200):
        shrink, grow = ClipState(DEMO), ClipState(DEMO)
        shrink.update(unclipped=count, count=count, rng=secure_generator())
        grow.update(unclipped=0, count=count, rng=secure_generator())
        assert shrink.clip_norm < 5.0 < grow.clip_norm


def test_release_is_centred_over_expected_clients():
    # (sum(b - 1/2) + noise) / M + 1/2: with M = count it is the noised unclipped fraction.
    dp = CentralDP(
        noise_multiplier=1e-6,
        clip_norm=1.0,
        adaptive=True,
        clipped_count_stddev=1e-6,
        expected_clients=4,
    )
    assert ClipState(dp).update(unclipped=3, count=4, rng=secure_generator()) == pytest.approx(
        0.75, abs=1e-4
    )
    # Two updates of four expected, both unclipped: (1 + noise) / 4 + 1/2
    assert ClipState(dp).update(unclipped=2, count=2, rng=secure_generator()) == pytest.approx(
        0.75, abs=1e-4
    )
    with pytest.raises(ValueError, match="unclipped <= count"):
        ClipState(dp).update(unclipped=3, count=2, rng=secure_generator())
