"""A coordinator whose state folder fills up: a clear error, nothing committed lost, a restart resumes.

Real gRPC with mTLS on 127.0.0.1, real SQLite, and a real full file system: a
small tmpfs mounted for the test (so it needs root, as CI has).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fedpriv.coordinator import Coordinator, Store, read_checkpoint
from fedpriv.errors import StoreError
from tests.helpers import make_config, require_privilege, silo_thread


def _missing_privilege() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        return "mounts a small tmpfs to fill up: needs Linux, root and mount(8) (CI runs as root)"
    return None


@contextlib.contextmanager
def small_filesystem(path, size_mib: int):
    """A tmpfs of `size_mib` MiB mounted at `path` for the duration."""
    require_privilege(_missing_privilege())
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        require_privilege(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_stops_the_federation_clearly_and_a_restart_resumes(
    tmp_path, pki, array_client
):
    # Arrange: 4 MB checkpoints, every one kept, on a 24 MiB file system
    arrays = {"w": np.zeros(1_000_000, np.float32)}
    base = make_config(tmp_path, pki.root, arrays, num_rounds=10, federated_evaluation=False)

    def run(config):
        with Coordinator(config) as coordinator:
            with (
                silo_thread(array_client(delta=1.0), port=coordinator.port, tls=pki.tls("silo-a")),
                silo_thread(array_client(delta=3.0), port=coordinator.port, tls=pki.tls("silo-b")),
            ):
                return coordinator.wait(timeout_s=120)

    with small_filesystem(tmp_path / "small", 24) as mount:
        config = dataclasses.replace(base, state_dir=mount / "state")
        # Act: the disk fills up part way
        with pytest.raises(StoreError, match="No space left on device|disk is full") as caught:
            run(config)
        store = Store(config.state_dir)
        committed = store.last_committed()
        store.close()
        # Assert: what was committed is intact
        assert committed is not None and 1 <= committed.round < 10, caught.value
        model = read_checkpoint(committed.checkpoint, sha256=committed.sha256)
        np.testing.assert_allclose(model.arrays()["w"], 2.0 * committed.round)
        # Act: the operator makes room (keeps one checkpoint), and restarts
        assert run(dataclasses.replace(config, keep_checkpoints=1))
        store = Store(config.state_dir)
        final = store.last_committed()
        assert final is not None and final.round == 10
        np.testing.assert_allclose(
            read_checkpoint(final.checkpoint, sha256=final.sha256).arrays()["w"], 2.0 * 10
        )
        store.close()
