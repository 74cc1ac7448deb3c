"""`fedpriv run`'s default state folder is new for every run, even within one second."""

from __future__ import annotations

import datetime

from fedpriv.run import fresh_run_dir

NOW = datetime.datetime(2026, 12, 7, 5, 25, 11, 400_000, tzinfo=datetime.UTC)


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    first = fresh_run_dir(tmp_path / "runs", NOW)
    (first / "pki").mkdir()
    second = fresh_run_dir(tmp_path / "runs", NOW + datetime.timedelta(milliseconds=300))
    third = fresh_run_dir(tmp_path / "runs", NOW)
    assert [first.name, second.name, third.name] == [
        "20261207T052511Z",
        "20261207T052511Z-2",
        "20261207T052511Z-3",
    ]
    assert list(second.iterdir()) == [] and list(third.iterdir()) == []
    assert (first / "pki").is_dir()


def test_the_name_is_the_utc_time(tmp_path):
    local = NOW.astimezone(datetime.timezone(datetime.timedelta(hours=5)))
    assert fresh_run_dir(tmp_path, local).name == "20261207T052511Z"
