"""The pacing policy's budgets, and what the coordinator keeps of reported resources."""

from __future__ import annotations

import pytest

from fedpriv.coordinator.config import CoordinatorConfig
from fedpriv.coordinator.pacing import Pace, cannot_answer, step_budgets
from fedpriv.coordinator.registry import SiloRegistry
from fedpriv.errors import ConfigError
from fedpriv.wire.resources import Resources


def pace(step_seconds: float, full: int = 100) -> Resources:
    return Resources("cpu", 1, 0, step_seconds, full)


def test_silos_near_the_median_keep_their_full_work():
    reported = {"a": pace(0.010), "b": pace(0.0105), "c": pace(0.0108), "d": pace(0.05)}
    assert step_budgets(Pace.BALANCED, reported, list(reported)) == {"d": 21}


def test_a_budget_never_goes_below_min_work_or_one_step():
    reported = {"a": pace(0.01), "b": pace(0.01), "c": pace(10.0)}
    assert step_budgets(Pace.BALANCED, reported, list(reported)) == {"c": 10}
    assert step_budgets(Pace.BALANCED, reported, list(reported), min_work=0) == {"c": 1}


def test_unknown_paces_and_unselected_silos_get_no_budget():
    reported = {"a": pace(0.01), "b": Resources("cuda", 8), "c": pace(1.0)}
    # only two known paces among the selected (a, c): the median is their mean
    assert step_budgets(Pace.BALANCED, reported, ["a", "b", "c"]) == {"c": 50}
    assert step_budgets(Pace.BALANCED, reported, ["a", "b"]) == {}
    assert step_budgets(Pace.SLOWEST, reported, ["a", "b", "c"]) == {}


@pytest.mark.parametrize(
    "bad",
    [
        Resources(step_seconds=float("nan"), full_steps=10),
        Resources(step_seconds=-1.0, full_steps=10),
        Resources(device_kind="quantum"),
        Resources(device_count=10**6),
    ],
)
def test_the_registry_ignores_resources_that_make_no_sense(bad):
    registry = SiloRegistry(liveness_s=30, clock=lambda: 0.0)
    registry.note_resources("a", pace(0.5))
    registry.note_resources("a", bad)
    assert registry.resources() == {"a": pace(0.5)}


def test_the_config_reads_pace_and_names_a_wrong_one(tmp_path):
    base = {
        "federation": {"name": "f"},
        "server": {"address": "127.0.0.1:0"},
        "tls": {"ca": "ca.crt", "cert": "c.crt", "key": "c.key"},
        "model": {"checkpoint": "m.fpck"},
        "store": {"dir": "state"},
    }
    config = CoordinatorConfig.from_dict(
        {**base, "rounds": {"pace": "balanced"}}, base_dir=tmp_path
    )
    assert config.rounds.pace is Pace.BALANCED
    assert CoordinatorConfig.from_dict(base, base_dir=tmp_path).rounds.pace is Pace.SLOWEST
    with pytest.raises(ConfigError, match="rounds.pace = 'fastest'"):
        CoordinatorConfig.from_dict({**base, "rounds": {"pace": "fastest"}}, base_dir=tmp_path)


def test_no_budget_outlasts_the_deadline():
    # The median silo itself would take 10 s; the deadline is 5 s: every silo slower
    # than 90% of it gets what fits in 4.5 s, floors included.
    reported = {"a": pace(0.1), "b": pace(0.1), "c": pace(1.0)}
    assert step_budgets(Pace.BALANCED, reported, list(reported), deadline_s=5.0) == {
        "a": 45,
        "b": 45,
        "c": 4,
    }
    assert step_budgets(Pace.BALANCED, reported, list(reported), deadline_s=1000.0) == {"c": 10}


def test_only_a_balanced_pace_names_silos_whose_one_step_outlasts_the_deadline():
    reported = {"a": pace(0.01), "b": pace(53.0), "c": pace(55.0), "d": Resources("cpu", 1)}
    # 90% of 60 s is 54 s: c's single step cannot fit, b's can; d's pace is unknown
    assert cannot_answer(Pace.BALANCED, reported, list(reported), deadline_s=60) == {"c": 55.0}
    assert cannot_answer(Pace.BALANCED, reported, ["a", "b"], deadline_s=60) == {}
    assert cannot_answer(Pace.SLOWEST, reported, list(reported), deadline_s=60) == {}


def test_the_registry_leaves_avoided_silos_out_only_while_enough_others_remain():
    registry = SiloRegistry(liveness_s=30, clock=lambda: 0.0)
    for silo in ("a", "b", "c"):
        registry.touch(silo)
    assert registry.select(needed=3, at_most=0, avoid={"c"}, keep=2) == ["a", "b"]
    # with fewer than `keep` others left, the avoided silo takes part
    assert registry.select(needed=3, at_most=0, avoid={"b", "c"}, keep=2) == ["a", "b", "c"]
    # `needed` still counts every live silo: two of three connected start nothing
    registry.forget("a")
    assert registry.select(needed=3, at_most=0, avoid={"c"}, keep=1) is None


def test_the_registry_counts_the_rounds_each_silo_was_left_out():
    registry = SiloRegistry(liveness_s=30, clock=lambda: 0.0)
    for _ in range(3):
        registry.round_selected(["a", "b"], ["c"])
    assert registry.left_out_rounds("c") == 3 and registry.left_out_rounds("a") == 0
    registry.round_selected(["a", "b", "c"], [])
    assert registry.left_out_rounds("c") == 0
