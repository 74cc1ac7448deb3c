"""`fedpriv.cli.main()` called in-process leaves logging as it found it."""

from __future__ import annotations

import io
import logging

from fedpriv.cli import main


def test_main_logs_to_the_stderr_of_its_call_and_then_restores_the_root_logger(
    tmp_path, monkeypatch
):
    root = logging.getLogger()
    before = io.StringIO()
    mine = logging.StreamHandler(before)
    root.addHandler(mine)
    saved_level, saved_handlers = root.level, list(root.handlers)
    during = io.StringIO()
    monkeypatch.setattr("sys.stderr", during)
    try:
        # A config that cannot be read: main logs nothing but reports it on stderr.
        assert main(["status", "--config", str(tmp_path / "missing.toml")]) == 2
        assert "cannot read config" in during.getvalue()
        assert root.handlers == saved_handlers and root.level == saved_level
        during.close()
        # A record after main returned goes to the handlers from before, not the
        # stream main was given (closed here, as pytest closes a finished test's).
        logging.getLogger("fedpriv.after").warning("after main")
        assert "after main" in before.getvalue()
    finally:
        root.removeHandler(mine)


def test_records_during_a_command_go_to_its_stderr(monkeypatch):
    from fedpriv.cli.logs import logging_to_stderr

    during = io.StringIO()
    monkeypatch.setattr("sys.stderr", during)
    with logging_to_stderr(logging.INFO):
        logging.getLogger("fedpriv.test").info("inside the command")
    assert "INFO fedpriv.test: inside the command" in during.getvalue()
