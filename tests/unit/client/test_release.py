"""The release policy: what a DP silo may send besides its update, and its TOML keys."""

from __future__ import annotations

import pathlib
import warnings

import pytest

from fedpriv.client.config import ClientConfig
from fedpriv.client.release import DP_NUM_EXAMPLES, ReleasePolicy
from fedpriv.errors import ConfigError, PrivacyWarning

METRICS = {"train_loss": 0.25, "accuracy": 0.9}


def test_without_dp_results_pass_unchanged():
    policy = ReleasePolicy()
    fit = policy.fit(METRICS, num_examples=137, private=False)
    evaluation = policy.evaluate(METRICS, num_examples=41, private=False)
    assert (dict(fit.metrics), fit.num_examples, fit.dropped) == (METRICS, 137, ())
    assert (dict(evaluation.metrics), evaluation.num_examples) == (METRICS, 41)


def test_under_dp_metrics_are_dropped_and_the_count_is_a_constant():
    policy = ReleasePolicy()
    fit = policy.fit(METRICS, num_examples=137, private=True)
    evaluation = policy.evaluate(METRICS, num_examples=41, private=True)
    assert (dict(fit.metrics), fit.num_examples) == ({}, DP_NUM_EXAMPLES)
    assert fit.dropped == ("accuracy", "train_loss")
    assert (dict(evaluation.metrics), evaluation.num_examples) == ({}, DP_NUM_EXAMPLES)


def test_neighbouring_datasets_send_the_same_count():
    policy = ReleasePolicy(public_num_examples=500)
    sizes = {policy.fit({}, num_examples=n, private=True).num_examples for n in (136, 137)}
    assert sizes == {500}


def test_opt_ins_keep_named_metrics_and_public_evaluation():
    policy = ReleasePolicy(share_metrics=("train_loss",), public_evaluation=True)
    fit = policy.fit(METRICS, num_examples=137, private=True)
    evaluation = policy.evaluate(METRICS, num_examples=41, private=True)
    assert dict(fit.metrics) == {"train_loss": 0.25} and fit.dropped == ("accuracy",)
    assert (dict(evaluation.metrics), evaluation.num_examples) == (METRICS, 41)


def test_announce_warns_only_for_shared_metrics():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ReleasePolicy(public_evaluation=True, public_num_examples=10).announce()
    assert caught == []
    with pytest.warns(PrivacyWarning, match="train_loss") as shared:
        ReleasePolicy(share_metrics=("train_loss",)).announce()
    assert len(shared) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"share_metrics": ("",)}, "share_metrics"),
        ({"share_metrics": ("a", "a")}, "listed twice"),
        ({"public_num_examples": 0}, r"public_num_examples = 0"),
        ({"public_num_examples": 2**53 + 1}, "public_num_examples"),
    ],
)
def test_bad_policies_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ReleasePolicy(**kwargs)


def _config(privacy: dict) -> ClientConfig:
    return ClientConfig.from_dict(
        {"coordinator": {"address": "127.0.0.1:1"}, "privacy": privacy},
        base_dir=pathlib.Path("/tmp"),
    )


def test_toml_keys_reach_the_policy():
    config = _config(
        {"share_metrics": ["train_loss"], "public_evaluation": True, "public_num_examples": 250}
    )
    assert config.release == ReleasePolicy(
        share_metrics=("train_loss",), public_evaluation=True, public_num_examples=250
    )
    assert _config({}).release == ReleasePolicy()


@pytest.mark.parametrize(
    ("privacy", "match"),
    [
        ({"share_metrics": "train_loss"}, "list of strings"),
        ({"share_metrics": [1]}, "list of strings"),
        ({"public_evaluation": "yes"}, "expected bool"),
        ({"public_num_examples": 1.5}, "expected int"),
        ({"share_metric": ["x"]}, "unknown key"),
    ],
)
def test_bad_toml_values_are_config_errors(privacy, match):
    with pytest.raises(ConfigError, match=match):
        _config(privacy)
