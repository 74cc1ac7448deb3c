from __future__ import annotations

import pytest

from tests.unit.strategy.spooling import Spools


@pytest.fixture
def spools(tmp_path):
    """Real spool files under the test's directory, read through ``os.open`` descriptors."""
    spools = Spools(tmp_path)
    yield spools
    spools.close()
