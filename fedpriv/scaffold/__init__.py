"""``fedpriv init DIR``: a federation that runs as printed, on one machine.

It writes a CA, a certificate per party, one TOML file per party and an
example silo app (:mod:`fedpriv.scaffold.app`), each party in its own folder,
as they would sit on separate machines. The CA's key stays in ``DIR/ca``.
"""

from __future__ import annotations

from fedpriv.scaffold.writer import Scaffold, scaffold

__all__ = ["Scaffold", "scaffold"]
