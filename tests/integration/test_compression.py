"""Update compression over real gRPC and mTLS: bytes on the wire and the aggregate."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedpriv.coordinator import Coordinator, SecAggConfig, Store, read_checkpoint
from fedpriv.errors import ConfigError
from fedpriv.wire import Compression
from tests.apps import RandomUpdateClient, random_update
from tests.helpers import CollectingReporter, make_config, silo_thread, wait_silos

SHAPES = {"w": (256, 64), "b": (64,)}
MODEL_BYTES = 4 * (256 * 64 + 64)


def run(tmp_path, pki, compression, rounds=3):
    config = make_config(
        tmp_path,
        pki.root,
        {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()},
        num_rounds=rounds,
        federated_evaluation=False,
        chunk_bytes=8192,
        update_compression=compression,
    )
    reporter = CollectingReporter()
    with Coordinator(config, reporter=reporter) as coordinator:
        with (
            silo_thread(RandomUpdateClient(0), port=coordinator.port, tls=pki.tls("silo-a")) as a,
            silo_thread(RandomUpdateClient(1), port=coordinator.port, tls=pki.tls("silo-b")) as b,
        ):
            assert coordinator.wait(timeout_s=60)
            wait_silos([a, b])
    store = Store(config.state_dir)
    committed = store.last_committed()
    store.close()
    final = read_checkpoint(committed.checkpoint).arrays()
    return reporter, final


@pytest.mark.parametrize(
    ("compression", "ratio", "tolerance"),
    [
        (Compression.NONE, 1.0, 1e-6),
        (Compression.FP16, 0.5, 1e-4),
        (Compression.BF16, 0.5, 2e-3),
        # int8 step: max|update| / 127 ~ 1.6e-3; error feedback leaves at most one half-step
        (Compression.INT8, 0.25, 1e-3),
    ],
)
def test_compressed_updates_shrink_the_wire_and_keep_the_average(
    tmp_path, pki, compression, ratio, tolerance
):
    reporter, final = run(tmp_path, pki, compression)
    # every round: two updates of (model bytes x ratio), plus int8's 4-byte scale per chunk
    chunks = -(-MODEL_BYTES // 8192)
    expected = 2 * (MODEL_BYTES * ratio + (4 * chunks if compression is Compression.INT8 else 0))
    assert [s.bytes_received for s in reporter.completed] == [expected] * 3
    # each round adds the mean of the two silos' fixed updates; error feedback keeps
    # three rounds of rounding from piling up
    updates = [random_update(i, SHAPES) for i in (0, 1)]
    for name in SHAPES:
        target = 3 * (updates[0][name] + updates[1][name]) / 2
        np.testing.assert_allclose(final[name], target, atol=tolerance)


def test_compression_is_refused_with_secure_aggregation_and_unknown_values(tmp_path, pki):
    config = make_config(
        tmp_path, pki.root, {"w": np.zeros(4, np.float32)}, update_compression=Compression.INT8
    )
    with pytest.raises(ConfigError, match="update_compression = 'int8' cannot be combined"):
        dataclasses.replace(config, secure_aggregation=SecAggConfig())
    with pytest.raises(ConfigError, match="needs a float32 model"):
        Coordinator(
            make_config(
                tmp_path / "f64",
                pki.root,
                {"w": np.zeros(4, np.float64)},
                update_compression=Compression.BF16,
            )
        )
