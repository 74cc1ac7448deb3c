"""The [dp] table's expected_clients: its default and the bounds the rounds config puts on it."""

from __future__ import annotations

import pytest

from fedpriv.errors import ConfigError
from tests.unit.coordinator.test_config import GOOD, parse

ADAPTIVE = "[dp]\nnoise_multiplier = 0.2\nclip_norm = 1.0\nadaptive = true\n"


def test_expected_clients_defaults_to_min_clients_and_can_be_set():
    config = parse(GOOD + ADAPTIVE + "clipped_count_stddev = 0.5\n")
    assert config.dp is not None and config.dp.expected_clients == 2
    # The default sigma_b = M / 20 = 0.1 does not exceed z / 2 = 0.1: refused, with the reason.
    with pytest.raises(ConfigError, match=r"dp\.clipped_count_stddev = 0\.1: adaptive clipping"):
        parse(GOOD + ADAPTIVE)
    one = parse(GOOD + ADAPTIVE + "expected_clients = 1\nclipped_count_stddev = 0.5\n")
    assert one.dp is not None and one.dp.expected_clients == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            GOOD + ADAPTIVE + "expected_clients = 3\nclipped_count_stddev = 0.5\n",
            r"dp\.expected_clients = 3: must be <= the number of federation\.allowed_silos \(2\)",
        ),
        (
            GOOD.replace(
                'allowed_silos = ["a", "b"]', 'allowed_silos = ["a", "b", "c", "d"]'
            ).replace("min_clients = 2", "min_clients = 2\nmax_clients = 2")
            + ADAPTIVE
            + "expected_clients = 3\nclipped_count_stddev = 0.5\n",
            r"dp\.expected_clients = 3: must be <= rounds\.max_clients \(2\)",
        ),
        (GOOD + ADAPTIVE + "expected_clients = 0\n", r"dp\.expected_clients = 0: must be an int"),
        (GOOD + ADAPTIVE + "expected_clients = 2.0\n", r"dp\.expected_clients: expected int"),
        (
            GOOD + ADAPTIVE + "clipped_count_stddev = 0.05\n",
            r"dp\.clipped_count_stddev = 0\.05: adaptive clipping needs .* > dp\.noise_multiplier / 2",
        ),
    ],
)
def test_bad_expected_clients_or_count_noise_names_the_field(text, message):
    with pytest.raises(ConfigError, match=message):
        parse(text)
