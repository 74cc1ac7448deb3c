"""Strategies by name: each name builds its rule, and every wrong name or option says what fits."""

from __future__ import annotations

import numpy as np
import pytest

from fedpriv.errors import ConfigError
from fedpriv.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    Krum,
    Median,
    StrategyName,
    TrimmedMean,
    build_strategy,
)
from fedpriv.strategy.protocol import Strategy, WholeUpdateStrategy
from fedpriv.wire import Model

MODEL = Model.from_arrays({"w": np.zeros(3, np.float32)})


@pytest.mark.parametrize(
    ("name", "options", "cls"),
    [
        ("fedavg", {}, FedAvg),
        ("fedprox", {"proximal_mu": 0.1}, FedProx),
        ("fedadam", {"eta": 0.01, "beta_1": 0.8, "tau": 1e-3}, FedAdam),
        ("fedyogi", {}, FedYogi),
        ("fedadagrad", {"eta": 1}, FedAdagrad),
        ("krum", {"byzantine": 1, "keep": 2}, Krum),
        ("median", {"slice_bytes": 4096}, Median),
        ("trimmed_mean", {"beta": 0.1}, TrimmedMean),
    ],
)
def test_every_name_builds_its_strategy(name, options, cls):
    strategy = build_strategy(name, model=MODEL, options=options)
    assert type(strategy) is cls
    assert strategy.name == name == StrategyName(name).value
    robust = cls in (Krum, Median, TrimmedMean)
    assert isinstance(strategy, WholeUpdateStrategy if robust else Strategy)
    for option, value in options.items():
        if option != "slice_bytes":
            assert getattr(strategy, option) == value


def test_every_strategy_name_has_a_recipe():
    for name in StrategyName:
        options = {"fedprox": {"proximal_mu": 0.0}, "krum": {"byzantine": 0}}.get(name.value, {})
        assert build_strategy(name.value, model=MODEL, options=options).name == name.value


def test_server_optimisers_allocate_their_moments_for_the_model():
    strategy = build_strategy("fedadam", model=MODEL, options={})
    assert [m.shape for m in strategy._m] == [(3,)]


def test_an_unknown_name_lists_the_accepted_ones():
    with pytest.raises(ConfigError, match="'fedsgd'.*fedavg, fedprox, fedadam, .*trimmed_mean"):
        build_strategy("fedsgd", model=MODEL, options={})


def test_unknown_and_missing_options_list_the_accepted_ones():
    with pytest.raises(
        ConfigError,
        match=r"fedadam: does not accept lr, momentum \(accepted: beta_1, beta_2, eta, eta_l, tau\)",
    ):
        build_strategy("fedadam", model=MODEL, options={"lr": 0.1, "momentum": 0.9})
    with pytest.raises(ConfigError, match=r"krum: needs byzantine \(accepted: byzantine, keep"):
        build_strategy("krum", model=MODEL, options={})
    with pytest.raises(ConfigError, match=r"fedavg: does not accept eta \(accepted: no options\)"):
        build_strategy("fedavg", model=MODEL, options={"eta": 0.1})


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("krum", {"byzantine": "1"}, "byzantine for krum = '1': must be an integer"),
        ("krum", {"byzantine": 1.5}, "must be an integer"),
        ("krum", {"byzantine": True}, "must be an integer"),
        ("fedadam", {"eta": "0.1"}, "eta for fedadam = '0.1': must be a number"),
        ("fedprox", {"proximal_mu": False}, "must be a number"),
        ("trimmed_mean", {"beta": 0.6}, "beta = 0.6"),
        ("fedyogi", {"beta_2": 1.0}, "beta_2 = 1.0"),
    ],
)
def test_mistyped_or_out_of_range_options_are_config_errors(name, options, message):
    with pytest.raises(ConfigError, match=message):
        build_strategy(name, model=MODEL, options=options)


def test_an_integral_float_is_accepted_for_an_integer_option():
    assert build_strategy("krum", model=MODEL, options={"byzantine": 2.0}).byzantine == 2
