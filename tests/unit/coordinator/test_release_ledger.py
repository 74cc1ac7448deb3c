"""The federation's release ledger: typed rows, committed with their round or not at all."""

from __future__ import annotations

import logging
import sqlite3

import numpy as np
import pytest

from fedpriv.coordinator.release_ledger import FederationAccount, Mechanism, Release
from fedpriv.coordinator.store import Store
from fedpriv.errors import StoreError
from fedpriv.privacy.accounting import GaussianSteps, SkellamSum, account
from fedpriv.wire import Model

DELTA = 1e-5


def gaussian(round: int, *, clip_norm: float = 1.0, next_clip_norm: float = 0.9) -> Release:
    return Release(
        round=round,
        mechanism=Mechanism.GAUSSIAN,
        noise_multiplier=0.7,
        l2_sensitivity=clip_norm,
        clip_norm=clip_norm,
        next_clip_norm=next_clip_norm,
        delta=DELTA,
    )


def skellam(round: int) -> Release:
    return Release(
        round=round,
        mechanism=Mechanism.SKELLAM,
        noise_multiplier=1.0,
        skellam_mu=4.0e6,
        l1_sensitivity=3.0e4,
        l2_sensitivity=1.1e3,
        clip_norm=1.0,
        colluders_tolerated=1,
        delta=DELTA,
    )


def stage(store: Store, round: int, release: Release | None = None):
    if release is not None:
        store.releases.stage(release)
    return store.stage_round(
        round=round,
        model=Model.from_arrays({"w": np.full(4, round, np.float32)}),
        started_unix_s=0.0,
        selected=2,
        accepted=2,
        total_weight=2.0,
    )


def test_a_committed_release_is_read_back_exactly_after_reopening(tmp_path):
    # Arrange
    store = Store(tmp_path)
    store.commit_staged(stage(store, 0))
    store.commit_staged(stage(store, 1, gaussian(1, next_clip_norm=0.123456789012345)))
    store.commit_staged(stage(store, 2, skellam(2)))
    store.close()
    # Act
    store = Store(tmp_path)
    releases = store.releases.releases()
    store.close()
    # Assert: the same frozen values, float for float, and the accountant's inputs
    assert releases == [gaussian(1, next_clip_norm=0.123456789012345), skellam(2)]
    assert releases[0].to_accountant() == GaussianSteps(
        noise_multiplier=0.7, sample_rate=1.0, steps=1
    )
    assert releases[1].to_accountant() == SkellamSum(
        mu=4.0e6, l1_sensitivity=3.0e4, l2_sensitivity=1.1e3
    )


def test_a_crash_between_stage_and_commit_records_nothing_for_the_round(tmp_path):
    # Arrange: round 1 committed with its release; round 2 staged with its release
    store = Store(tmp_path)
    store.commit_staged(stage(store, 0))
    store.commit_staged(stage(store, 1, gaussian(1)))
    staged = stage(store, 2, gaussian(2))
    assert staged.release == gaussian(2)
    # Act: the process dies before commit_staged (nothing of round 2 reaches SQLite)
    store.close()
    store = Store(tmp_path)
    # Assert: round 1 and its release survive; round 2 left neither a row nor a release
    assert store.rounds() == [0, 1]
    assert store.releases.releases() == [gaussian(1)]
    assert store.remove_orphans() == [staged.temporary]
    # ... and the round, run again, commits its (new) release once
    store.commit_staged(stage(store, 2, gaussian(2, next_clip_norm=0.8)))
    assert store.releases.releases() == [gaussian(1), gaussian(2, next_clip_norm=0.8)]
    store.close()


@pytest.mark.parametrize("table", ["rounds", "federation_releases"])
def test_a_commit_that_fails_in_either_table_leaves_neither_the_round_nor_its_release(
    tmp_path, table
):
    # Arrange: SQLite itself refuses round 2's row in one of the two tables
    store = Store(tmp_path)
    store.commit_staged(stage(store, 0))
    store.commit_staged(stage(store, 1, gaussian(1)))
    with sqlite3.connect(tmp_path / "state.sqlite3") as db:
        db.execute(
            f"CREATE TRIGGER refuse BEFORE INSERT ON {table} WHEN NEW.round = 2 "
            "BEGIN SELECT RAISE(ABORT, 'disk said no'); END"
        )
    # Act
    with pytest.raises(StoreError, match="cannot commit round 2: disk said no"):
        store.commit_staged(stage(store, 2, gaussian(2)))
    # Assert
    assert store.rounds() == [0, 1]
    assert store.releases.releases() == [gaussian(1)]
    store.close()


def test_a_second_release_for_a_committed_round_fails_the_commit(tmp_path):
    store = Store(tmp_path)
    store.commit_staged(stage(store, 1, gaussian(1)))
    with pytest.raises(StoreError, match="cannot commit round 1"):
        store.commit_staged(stage(store, 1, gaussian(1, next_clip_norm=0.5)))
    assert store.releases.releases() == [gaussian(1)]
    store.close()


def test_a_release_staged_for_another_round_is_not_committed_with_this_one(tmp_path):
    store = Store(tmp_path)
    store.releases.stage(gaussian(3))
    assert stage(store, 2).release is None
    assert stage(store, 3).release == gaussian(3)
    assert stage(store, 3).release is None  # taken once
    store.close()


def test_releases_before_a_round_leave_out_that_round_and_later_ones(tmp_path):
    store = Store(tmp_path)
    for round in (1, 2, 3):
        store.commit_staged(stage(store, round, gaussian(round)))
    assert [r.round for r in store.releases.releases(before=3)] == [1, 2]
    store.close()


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"round": 0}, "round = 0: must be >= 1"),
        ({"noise_multiplier": None}, "noise_multiplier = None: must be > 0"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier = nan"),
        ({"clip_norm": 0.0}, "clip_norm = 0.0"),
        ({"delta": 1.0}, "delta = 1.0: must be in"),
        ({"sample_rate": 0.0}, "sample_rate = 0.0"),
        ({"steps": 0}, "steps = 0"),
        ({"colluders_tolerated": -1}, "colluders_tolerated = -1"),
        ({"skellam_mu": 3.0}, "a Gaussian release has no skellam_mu"),
    ],
)
def test_a_gaussian_release_with_a_bad_field_is_refused_and_says_which(changes, problem):
    fields = {
        "round": 1,
        "mechanism": Mechanism.GAUSSIAN,
        "noise_multiplier": 1.0,
        "clip_norm": 1.0,
        "delta": DELTA,
        **changes,
    }
    with pytest.raises(ValueError, match=problem):
        Release(**fields)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"skellam_mu": None}, "skellam_mu = None: must be > 0 for Skellam"),
        ({"l1_sensitivity": -1.0}, "l1_sensitivity = -1.0"),
        ({"l2_sensitivity": None}, "l2_sensitivity = None"),
        ({"steps": 2}, "one unsampled sum"),
        ({"next_clip_norm": 0.5}, "no next_clip_norm"),
    ],
)
def test_a_skellam_release_with_a_bad_field_is_refused_and_says_which(changes, problem):
    fields = {
        "round": 1,
        "mechanism": Mechanism.SKELLAM,
        "noise_multiplier": None,
        "skellam_mu": 1.0,
        "l1_sensitivity": 1.0,
        "l2_sensitivity": 1.0,
        "clip_norm": 1.0,
        "delta": DELTA,
        **changes,
    }
    with pytest.raises(ValueError, match=problem):
        Release(**fields)


def test_an_unreadable_row_is_a_store_error_that_names_the_round(tmp_path):
    store = Store(tmp_path)
    store.commit_staged(stage(store, 1, gaussian(1)))
    with sqlite3.connect(tmp_path / "state.sqlite3") as db:
        db.execute("UPDATE federation_releases SET mechanism = 'laplace'")
    with pytest.raises(StoreError, match="unreadable row for round 1"):
        store.releases.releases()
    store.close()


def test_the_account_replaces_a_round_tried_again_and_stages_each_release(tmp_path):
    # Arrange: round 1 committed; round 2's first attempt drew its noise, then failed
    store = Store(tmp_path)
    store.commit_staged(stage(store, 1, gaussian(1)))
    account_ = FederationAccount.resume(store.releases, next_round=2, delta=DELTA)
    account_.spend(gaussian(2, next_clip_norm=0.5))
    # Act: the second attempt at round 2
    spent = account_.spend(gaussian(2, next_clip_norm=0.6))
    committed = stage(store, 2)
    # Assert: two releases accounted, not three; the new one is what round 2 commits
    two = [GaussianSteps(noise_multiplier=0.7, sample_rate=1.0, steps=1)] * 2
    assert spent == account(two, delta=DELTA)
    assert committed.release == gaussian(2, next_clip_norm=0.6)
    assert account_.next_clip_norm == 0.6
    store.close()


# The previous version's schema, as its store created it (before federation_releases).
OLD_SCHEMA = """
CREATE TABLE rounds (
    round INTEGER PRIMARY KEY, started_unix_s REAL NOT NULL, finished_unix_s REAL NOT NULL,
    selected INTEGER NOT NULL, accepted INTEGER NOT NULL, total_weight REAL NOT NULL,
    checkpoint TEXT NOT NULL, sha256 TEXT NOT NULL
);
CREATE TABLE metrics (
    round INTEGER NOT NULL, source TEXT NOT NULL, name TEXT NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (round, source, name)
);
CREATE TABLE round_privacy (round INTEGER PRIMARY KEY, mode TEXT NOT NULL);
"""


def write_old_state(directory, federation_rows: dict[int, dict[str, float]]) -> None:
    """A state database as the previous version wrote it: the ledger was metric rows."""
    directory.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(directory / "state.sqlite3") as db:
        db.executescript(OLD_SCHEMA)
        for round in range(max(federation_rows) + 1):
            db.execute(
                "INSERT INTO rounds VALUES (?, 0, 0, 2, 2, 2.0, ?, '00')",
                (round, f"checkpoints/round-{round:06d}.fpck"),
            )
        for round, values in federation_rows.items():
            db.executemany(
                "INSERT INTO metrics VALUES (?, 'federation', ?, ?)",
                [(round, name, value) for name, value in values.items()],
            )
            db.execute("INSERT INTO metrics VALUES (?, 'fit', 'train_loss', 0.5)", (round,))


def old_central_rows(rounds: int) -> dict[int, dict[str, float]]:
    """What the previous _privatize committed for `rounds` adaptive DP-FedAvg rounds."""
    rows = {}
    clip_norm = 10.0
    for round in range(1, rounds + 1):
        history = [GaussianSteps(noise_multiplier=0.7, sample_rate=1.0, steps=1)] * round
        spent = account(history, delta=DELTA)
        rows[round] = {
            "epsilon": spent.epsilon,
            "epsilon_rdp": spent.epsilon_rdp,
            "delta": DELTA,
            "noise_multiplier": 0.7,
            "clip_norm": clip_norm,
            "noise_stddev": 0.71 * clip_norm,
            "next_clip_norm": clip_norm * 0.91,
            "unclipped_fraction": 0.97,
            "clipped_count_stddev": 2.0,
            "count_sensitivity": 0.5,
        }
        clip_norm *= 0.91
    return rows


def test_a_previous_versions_state_resumes_with_the_same_epsilon_and_norm(tmp_path, caplog):
    # Arrange: three central rounds committed by the previous version
    old = old_central_rows(3)
    write_old_state(tmp_path, old)
    store = Store(tmp_path)
    # Act
    with caplog.at_level(logging.INFO, logger="fedpriv.coordinator.release_ledger"):
        resumed = FederationAccount.resume(store.releases, next_round=4, delta=DELTA)
    # Assert: the rows became releases, once, and say so
    releases = store.releases.releases()
    assert [(r.round, r.mechanism) for r in releases] == [
        (r, Mechanism.GAUSSIAN) for r in (1, 2, 3)
    ]
    assert [r.clip_norm for r in releases] == [old[r]["clip_norm"] for r in (1, 2, 3)]
    assert "release ledger migrated releases=3 rounds=1..3" in caplog.text
    # ... the epsilon they add up to is the one the old version committed, exactly
    assert account([r.to_accountant() for r in releases], delta=DELTA).epsilon == old[3]["epsilon"]
    assert resumed.next_clip_norm == old[3]["next_clip_norm"]
    # ... and round 4 costs what it would have cost without the upgrade
    spent = resumed.spend(gaussian(4))
    history = [GaussianSteps(noise_multiplier=0.7, sample_rate=1.0, steps=1)] * 4
    assert spent.epsilon == account(history, delta=DELTA).epsilon
    # A second start reads the table, and migrates nothing again
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fedpriv.coordinator.release_ledger"):
        again = FederationAccount.resume(store.releases, next_round=4, delta=DELTA)
    assert "migrated" not in caplog.text
    assert again.releases == releases
    store.close()


def test_a_previous_versions_distributed_rounds_migrate_as_skellam_releases(tmp_path):
    # Arrange: secure-aggregation rounds stored skellam_mu beside the configured z
    rows = {
        round: {
            "epsilon": 0.0,
            "delta": DELTA,
            "skellam_mu": 4.0e6,
            "l1_sensitivity": 3.0e4,
            "l2_sensitivity": 1.1e3,
            "clip_norm": 1.0,
            "noise_multiplier": 1.0,
            "survivors": 3.0,
        }
        for round in (1, 2)
    }
    rows[2]["colluders_tolerated"] = 1.0  # recorded from a later version on
    write_old_state(tmp_path, rows)
    store = Store(tmp_path)
    # Act
    releases = store.releases.migrate_metric_rows(delta=DELTA)
    # Assert
    assert releases == store.releases.releases()
    assert [r.mechanism for r in releases] == [Mechanism.SKELLAM] * 2
    assert [r.colluders_tolerated for r in releases] == [0, 1]
    assert releases[1] == skellam(2)
    store.close()


def test_a_previous_versions_state_without_dp_migrates_nothing(tmp_path):
    write_old_state(tmp_path, {1: {"survivors": 3.0}})
    store = Store(tmp_path)
    assert store.releases.migrate_metric_rows(delta=DELTA) == []
    assert store.releases.releases() == []
    store.close()
