"""FedAdam under secure aggregation: the digits demo end to end, and the same model as in plain text."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import subprocess
import sys

import numpy as np

from fedpriv.coordinator import SecAggConfig, Store, read_checkpoint
from fedpriv.coordinator.config import StrategyConfig
from fedpriv.secagg import RingCodec
from tests.apps import RandomUpdateClient
from tests.conftest import SILOS
from tests.helpers import make_config, run_three_silos

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHAPES = {"w": (300, 100), "b": (100,)}
CLIP_NORM = (
    20.0  # above every RandomUpdateClient update's norm (~8.7): secure aggregation clips nothing
)
# An adaptivity floor well above the ring's step (~6e-8) bounds how far the step can move
# with the sum: see the bound in the test.
FEDADAM = StrategyConfig(name="fedadam", options={"tau": 1e-3})


def test_digits_demo_with_fedadam_dp_and_secure_aggregation_reaches_85_percent(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "examples/digits/demo.py",
            "--dp",
            "--secagg",
            "--strategy",
            "fedadam",
            "--workdir",
            str(tmp_path / "demo"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    toml = (tmp_path / "demo" / "coordinator.toml").read_text()
    assert 'name = "fedadam"' in toml and "eta = 0.2" in toml
    lines = result.stdout.splitlines()
    final = [line for line in lines if line.startswith("final accuracy:")]
    assert final and float(final[0].split(":")[1]) >= 0.85
    # Every round was unmasked with all three silos, and the federation released an epsilon.
    store = Store(tmp_path / "demo" / "state")
    rows: dict[int, dict[str, float]] = {}
    for round, _, name, value in store.metrics(source="federation"):
        rows.setdefault(round, {})[name] = value
    store.close()
    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert [r["survivors"] for r in rows.values()] == [3.0] * 5
    federation = [line for line in lines if line.startswith("federation epsilon:")]
    assert len(federation) == 1 and float(federation[0].split()[2]) > 0


def _fedadam_model(tmp_path, pki, *, secure: bool) -> dict[str, np.ndarray]:
    config = make_config(
        tmp_path,
        pki.root,
        {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()},
        allowed=SILOS[:3],
        min_clients=3,
        max_clients=3,
        num_rounds=1,
        federated_evaluation=False,
    )
    config = dataclasses.replace(
        config,
        strategy=FEDADAM,
        secure_aggregation=SecAggConfig(clip_norm=CLIP_NORM, unmask_deadline_s=15)
        if secure
        else None,
    )
    clients = [RandomUpdateClient(i) for i in range(3)]
    reporter, _ = run_three_silos(config, pki, clients, SILOS[:3])
    assert [s.round for s in reporter.completed] == [1]
    store = Store(config.state_dir)
    committed = store.last_committed()
    store.close()
    assert committed is not None and committed.round == 1
    return read_checkpoint(committed.checkpoint).arrays()


def test_fedadam_under_secure_aggregation_steps_to_the_plain_text_model(tmp_path, pki):
    # Arrange / Act: the same three fixed updates (10 examples each, so the plain mean
    # is unweighted like the secure one), once in plain text and once masked in the ring
    plain = _fedadam_model(tmp_path / "plain", pki, secure=False)
    secure = _fedadam_model(tmp_path / "secure", pki, secure=True)
    # Assert: each silo's element is rounded to a neighbouring multiple of 1/scale, so the
    # mean update is off by less than 1/scale. In round 1 FedAdam steps
    # eta_1 * (1 - b1) * d / (sqrt(1 - b2) * |d| + tau), whose slope in d is at most
    # eta_1 * (1 - b1) / tau: the models differ by less than that times 1/scale.
    codec = RingCodec.plan(
        clip_norm=CLIP_NORM, size=sum(math.prod(s) for s in SHAPES.values()), clients=3, threshold=2
    )
    eta, beta_1, beta_2, tau = 0.1, 0.9, 0.99, 1e-3  # FedAdam's defaults, FEDADAM's tau
    eta_1 = eta * math.sqrt(1 - beta_2**2) / (1 - beta_1**2)
    bound = eta_1 * (1 - beta_1) / tau / codec.scale
    difference = max(float(np.max(np.abs(secure[n] - plain[n]))) for n in SHAPES)
    # float32 checkpoints round each weight (|w| <= eta_1 / sqrt(1 - b2) ~ 0.74) by ~4e-8 too.
    float32 = 2 * 0.74 * np.finfo(np.float32).eps
    assert difference <= bound + float32, (difference, bound, float32)
    moved = max(float(np.max(np.abs(plain[n]))) for n in SHAPES)
    assert moved > 100 * (bound + float32)  # the models moved far more than they differ
