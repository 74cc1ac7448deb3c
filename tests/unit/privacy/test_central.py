from __future__ import annotations

import math

import numpy as np
import pytest

from fedpriv.errors import ConfigError
from fedpriv.privacy.central import (
    CentralDP,
    ClipState,
    add_gaussian_noise,
    clip_factor,
    secure_generator,
)


def test_noise_has_the_requested_standard_deviation_in_float32_and_float64():
    for dtype in (np.float32, np.float64):
        values = np.full(3_000_000, 5.0, dtype)
        add_gaussian_noise(values, stddev=0.25, rng=np.random.default_rng(1))
        assert values.dtype == dtype
        assert float(values.mean()) == pytest.approx(5.0, abs=1e-3)
        assert float(values.std()) == pytest.approx(0.25, rel=5e-3)


def test_secure_generators_differ_between_calls():
    a = secure_generator().standard_normal(4)
    b = secure_generator().standard_normal(4)
    assert not np.array_equal(a, b)


def test_adaptive_update_noise_follows_andrew_et_al_theorem_1():
    dp = CentralDP(noise_multiplier=1.2, clip_norm=1.0, adaptive=True, clipped_count_stddev=2.0)
    # z^-2 = z_delta^-2 + (2 sigma_b)^-2
    assert dp.update_noise_multiplier**-2 + (2 * 2.0) ** -2 == pytest.approx(1.2**-2)
    assert CentralDP(noise_multiplier=1.2, clip_norm=1.0).update_noise_multiplier == 1.2


def test_adaptive_clip_norm_converges_to_the_target_quantile():
    # Arrange: update norms ~ |N(0, 1)| * 3; the median is 3 * 0.6745
    dp = CentralDP(
        noise_multiplier=0.5,
        clip_norm=0.1,
        adaptive=True,
        target_quantile=0.5,
        clipped_count_stddev=1.0,
        expected_clients=100,
    )
    state = ClipState(dp)
    rng = np.random.default_rng(7)
    # Act
    for _ in range(400):
        norms = np.abs(rng.standard_normal(100)) * 3.0
        state.update(unclipped=int((norms <= state.clip_norm).sum()), count=100, rng=rng)
    # Assert
    assert state.clip_norm == pytest.approx(3.0 * 0.6745, rel=0.1)


def test_fixed_clipping_never_moves_and_releases_no_count():
    # With fixed clipping no count is accounted, so none may be computed or released.
    state = ClipState(CentralDP(noise_multiplier=1.0, clip_norm=2.0))
    with pytest.raises(ValueError, match="fixed clipping"):
        state.update(unclipped=0, count=5, rng=np.random.default_rng(0))
    assert state.clip_norm == 2.0
    assert state.noise_stddev() == 2.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"noise_multiplier": 0.0, "clip_norm": 1.0}, "dp.noise_multiplier"),
        ({"noise_multiplier": 1.0, "clip_norm": math.inf}, "dp.clip_norm"),
        ({"noise_multiplier": 1.0, "clip_norm": 1.0, "target_quantile": 1.0}, "dp.target_quantile"),
        ({"noise_multiplier": 1.0, "clip_norm": 1.0, "delta": 0.0}, "dp.delta"),
        (
            {"noise_multiplier": 1.0, "clip_norm": 1.0, "adaptive": True, "expected_clients": 3},
            "dp.clipped_count_stddev",
        ),
        (
            # sigma_b must exceed z * sensitivity = z / 2 (here it equals it)
            {
                "noise_multiplier": 0.2,
                "clip_norm": 1.0,
                "adaptive": True,
                "clipped_count_stddev": 0.1,
            },
            "dp.clipped_count_stddev",
        ),
        (
            {"noise_multiplier": 1.0, "clip_norm": 1.0, "clipped_count_stddev": -1.0},
            "dp.clipped_count_stddev",
        ),
        ({"noise_multiplier": 1.0, "clip_norm": 1.0, "expected_clients": 0}, "dp.expected_clients"),
        (
            {"noise_multiplier": 1.0, "clip_norm": 1.0, "expected_clients": 2.5},
            "dp.expected_clients",
        ),
        (
            {"noise_multiplier": 1.0, "clip_norm": 1.0, "expected_clients": True},
            "dp.expected_clients",
        ),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        CentralDP(**kwargs)


def test_clip_factor_rejects_nonfinite_norms():
    with pytest.raises(ValueError):
        clip_factor(math.nan, 1.0)
