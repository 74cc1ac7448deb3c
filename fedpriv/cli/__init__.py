"""The ``fedpriv`` command line."""

from __future__ import annotations

from fedpriv.cli.main import main

__all__ = ["main"]
