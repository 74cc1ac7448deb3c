"""The store knows, per committed round, which DP it ran under, and each silo's last epsilon."""

from __future__ import annotations

import math

import numpy as np

from fedpriv.coordinator.privacy_record import RoundPrivacy
from fedpriv.coordinator.store import Store
from fedpriv.wire import Model


def commit(store: Store, round: int, *, metrics=None, privacy=None) -> None:
    model = Model.from_arrays({"w": np.zeros(4, np.float32)})
    store.commit_staged(
        store.stage_round(
            round=round,
            model=model,
            started_unix_s=0.0,
            selected=1,
            accepted=1,
            total_weight=1.0,
            metrics=metrics,
            privacy=privacy,
        )
    )


def test_round_privacy_is_recorded_and_survives_reopening(tmp_path):
    store = Store(tmp_path)
    commit(store, 0)
    commit(store, 1, privacy=RoundPrivacy.NONE)
    commit(store, 2, privacy=RoundPrivacy.CENTRAL)
    commit(store, 3, privacy=RoundPrivacy.DISTRIBUTED)
    store.close()
    store = Store(tmp_path)
    assert store.round_privacy() == {
        1: RoundPrivacy.NONE,
        2: RoundPrivacy.CENTRAL,
        3: RoundPrivacy.DISTRIBUTED,
    }
    store.close()


def test_rounds_committed_before_the_record_are_inferred_from_their_noise(tmp_path):
    store = Store(tmp_path)
    commit(store, 1, metrics={"fit": {"train_loss": 0.5}})
    commit(store, 2, metrics={"federation": {"epsilon": 1.0, "noise_multiplier": 1.0}})
    commit(store, 3, metrics={"federation": {"epsilon": 2.0, "skellam_mu": 9.0}})
    assert store.round_privacy() == {
        1: RoundPrivacy.NONE,
        2: RoundPrivacy.CENTRAL,
        3: RoundPrivacy.DISTRIBUTED,
    }
    store.close()


def test_silo_spends_are_the_last_committed_epsilon_and_delta(tmp_path):
    store = Store(tmp_path)
    commit(store, 1, metrics={"silo:a": {"epsilon": 1.0, "delta": 1e-5}, "silo:b": {"x": 1.0}})
    commit(store, 2, metrics={"silo:a": {"epsilon": 1.5, "delta": 1e-5}})
    commit(store, 3, metrics={"silo:c": {"epsilon": 0.5}})
    spends = store.silo_spends()
    assert spends.keys() == {"a", "c"}
    assert (spends["a"].round, spends["a"].epsilon, spends["a"].delta) == (2, 1.5, 1e-5)
    assert math.isnan(spends["c"].delta)
    store.close()
