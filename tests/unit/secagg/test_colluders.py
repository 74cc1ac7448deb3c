"""Distributed DP with k colluders tolerated: the noise nobody else knows covers what is accounted.

A silo that colludes with the coordinator knows its own Skellam noise and can
subtract it from the unmasked sum. With `tolerate_colluders = k`, each silo's
noise is sized so that the noise of t − k honest survivors alone is the central
mechanism's, and the coordinator accounts only (survivors − k) silos' noise.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedpriv.coordinator import SecAggConfig
from fedpriv.errors import ConfigError
from fedpriv.privacy.central import secure_generator
from fedpriv.secagg import RingCodec

SIZE = 200_000
CLIENTS, THRESHOLD, CLIP = 5, 3, 1.0
# The scaling by t - k does not depend on z.
NOISE = 0.01


def summed_noise(codec: RingCodec, silos: int) -> np.ndarray:
    """The sum of `silos` silos' ring noise on an all-zero update (zeros round to zeros)."""
    total = np.zeros(SIZE, np.int64)
    for _ in range(silos):
        ring, _ = codec.encode(np.zeros(SIZE), rng=secure_generator())
        total += ring.view(np.int32)
    return total


@pytest.mark.parametrize("colluders", [1, 2])
@pytest.mark.parametrize("survivors", [THRESHOLD, CLIENTS])
def test_the_noise_left_after_removing_k_silos_is_at_least_what_is_accounted(colluders, survivors):
    # Arrange
    codec = RingCodec.plan(
        clip_norm=CLIP,
        size=SIZE,
        clients=CLIENTS,
        threshold=THRESHOLD,
        noise_multiplier=NOISE,
        tolerate_colluders=colluders,
    )
    # Act: the k colluders subtract their own noise, so only the honest survivors' is left
    honest = summed_noise(codec, survivors - colluders)
    accounted_mu = (survivors - colluders) * codec.noise_variance  # as the coordinator accounts
    # Assert: the variance left is what is accounted (to sampling error, about 0.3% here) ...
    left = float(honest.var())
    assert left >= 0.98 * accounted_mu
    assert left == pytest.approx(accounted_mu, rel=0.02)
    # ... and even with only t survivors it is the central mechanism's (s·z·C)²
    central = (codec.scale * NOISE * CLIP) ** 2
    assert (THRESHOLD - colluders) * codec.noise_variance == pytest.approx(central, rel=1e-12)


def test_at_z_1_the_sampled_noise_variance_is_at_least_what_is_accounted():
    codec = RingCodec.plan(
        clip_norm=CLIP,
        size=SIZE,
        clients=CLIENTS,
        threshold=THRESHOLD,
        noise_multiplier=1.0,
        tolerate_colluders=1,
    )
    assert codec.noise_variance / 2 <= 1e12  # each Poisson half where numpy's sampler holds
    honest = summed_noise(codec, THRESHOLD - 1)
    assert float(honest.var()) >= 0.98 * (THRESHOLD - 1) * codec.noise_variance


def test_without_the_setting_one_colluder_leaves_less_noise_than_the_central_mechanism():
    codec = RingCodec.plan(
        clip_norm=CLIP, size=SIZE, clients=CLIENTS, threshold=THRESHOLD, noise_multiplier=NOISE
    )
    honest = summed_noise(codec, THRESHOLD - 1)
    central = (codec.scale * NOISE * CLIP) ** 2
    # t - 1 honest silos carry (t - 1)/t of the noise: under-noised by a third here
    assert float(honest.var()) < 0.75 * central


def test_the_ring_keeps_headroom_for_the_larger_noise():
    plain = RingCodec.plan(
        clip_norm=CLIP, size=10, clients=CLIENTS, threshold=THRESHOLD, noise_multiplier=NOISE
    )
    tolerant = RingCodec.plan(
        clip_norm=CLIP,
        size=10,
        clients=CLIENTS,
        threshold=THRESHOLD,
        noise_multiplier=NOISE,
        tolerate_colluders=2,
    )
    # n clipped updates plus 8 standard deviations of all n silos' noise stay below 2^31
    for codec in (plain, tolerant):
        reach = CLIENTS * codec.scale * CLIP + 8 * np.sqrt(CLIENTS * codec.noise_variance)
        assert reach < 2**31
    assert tolerant.scale < plain.scale


@pytest.mark.parametrize("colluders", [-1, THRESHOLD, THRESHOLD + 1])
def test_plan_refuses_colluders_outside_zero_to_threshold(colluders):
    with pytest.raises(ValueError, match="tolerate_colluders"):
        RingCodec.plan(
            clip_norm=CLIP,
            size=10,
            clients=CLIENTS,
            threshold=THRESHOLD,
            noise_multiplier=NOISE,
            tolerate_colluders=colluders,
        )


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"tolerate_colluders": -1}, "must be >= 0"),
        ({"threshold": 3, "tolerate_colluders": 3}, "less than secagg.threshold"),
    ],
)
def test_colluders_config_is_validated(settings, match):
    with pytest.raises(ConfigError, match=f"secagg.tolerate_colluders.*{match}"):
        SecAggConfig(**settings)


def test_colluders_must_stay_below_the_default_threshold_of_the_smallest_round():
    settings = SecAggConfig(tolerate_colluders=2)  # t = 2 for a round of 2 or 3 silos
    with pytest.raises(ConfigError, match="secagg.tolerate_colluders = 2"):
        settings.check_round_sizes(smallest=3, largest=None)
    settings.check_round_sizes(smallest=4, largest=None)  # t = 3 for 4 silos
