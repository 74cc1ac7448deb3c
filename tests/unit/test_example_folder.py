"""The examples' work folder: temporary ones are cleaned up, a user's folder is never wiped."""

from __future__ import annotations

import pathlib
import tempfile

import pytest

from examples.launcher import run_in_work_folder


@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    """Temporary folders go under tmp_path, where the test can see what is left."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def leftovers(root: pathlib.Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("fedpriv-test-"))


def test_a_successful_run_removes_its_temporary_folder_and_says_so(temp_root, capsys):
    seen: list[pathlib.Path] = []

    def body(work: pathlib.Path) -> int:
        (work / "logs").mkdir()
        seen.append(work)
        return 0

    assert run_in_work_folder(None, prefix="fedpriv-test-", keep=False, body=body) == 0
    assert seen and not seen[0].exists() and leftovers(temp_root) == []
    assert f"removed {seen[0]} (--keep or --workdir DIR keeps" in capsys.readouterr().out


@pytest.mark.parametrize(("keep", "code", "said"), [(True, 0, "kept"), (False, 1, "for its logs")])
def test_keep_or_a_failed_run_keeps_the_temporary_folder(temp_root, capsys, keep, code, said):
    assert run_in_work_folder(None, prefix="fedpriv-test-", keep=keep, body=lambda w: code) == code
    (left,) = leftovers(temp_root)
    assert said in capsys.readouterr().out


def test_an_exception_keeps_the_folder_and_propagates(temp_root):
    def body(work: pathlib.Path) -> int:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_in_work_folder(None, prefix="fedpriv-test-", keep=False, body=body)
    assert len(leftovers(temp_root)) == 1


def test_a_foreign_non_empty_workdir_is_refused_and_left_untouched(tmp_path, capsys):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    ran = []
    code = run_in_work_folder(
        str(precious), prefix="fedpriv-test-", keep=False, body=lambda w: ran.append(w) or 0
    )
    assert code == 2 and not ran
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert "is not empty and no example made it" in capsys.readouterr().err


def test_a_workdir_from_an_earlier_run_is_replaced_and_kept(tmp_path):
    work = tmp_path / "demo"
    assert (
        run_in_work_folder(
            str(work), prefix="x", keep=False, body=lambda w: (w / "old.log").write_text("1") and 0
        )
        == 0
    )
    assert (work / "old.log").exists()
    assert run_in_work_folder(str(work), prefix="x", keep=False, body=lambda w: 0) == 0
    assert work.is_dir() and not (work / "old.log").exists()
