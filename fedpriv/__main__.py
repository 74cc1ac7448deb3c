"""``python -m fedpriv`` runs the command line."""

from __future__ import annotations

import sys

from fedpriv.cli.main import main

sys.exit(main())
