"""The coordinator's Prometheus endpoint during a run, its JSONL log, and `fedpriv report`."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np

from fedpriv.client import FitResult
from fedpriv.coordinator import Coordinator
from tests.conftest import ArrayClient
from tests.helpers import make_config, silo_thread, wait_silos
from tests.integration.test_processes import ROOT


class ReportingClient(ArrayClient):
    """Reports a growing sample-level epsilon, as a DP silo's runtime does."""

    def fit(self, parameters, *, config):
        time.sleep(0.3)
        result = super().fit(parameters, config=config)
        return FitResult(
            parameters=result.parameters,
            num_examples=result.num_examples,
            metrics={**result.metrics, "epsilon": 0.5 * self.fits, "delta": 1e-5},
        )


def scrape(port: int) -> float | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    match = re.search(r"^fedpriv_rounds_completed_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def test_prometheus_counter_advances_and_report_plots_every_round(tmp_path, pki):
    # Arrange
    config = dataclasses.replace(
        make_config(tmp_path, pki.root, {"w": np.zeros(8, np.float32)}, num_rounds=4),
        prometheus="127.0.0.1:0",
    )
    seen: list[float] = []
    # Act: scrape the endpoint while the rounds run
    with Coordinator(config) as coordinator:
        port = coordinator.telemetry.port
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                value = scrape(port)
                if value is not None and (not seen or value != seen[-1]):
                    seen.append(value)
                time.sleep(0.05)

        poller = threading.Thread(target=poll)
        poller.start()
        with (
            silo_thread(ReportingClient(), port=coordinator.port, tls=pki.tls("silo-a")) as a,
            silo_thread(ReportingClient(), port=coordinator.port, tls=pki.tls("silo-b")) as b,
        ):
            assert coordinator.wait(timeout_s=60)
            wait_silos([a, b])
        time.sleep(0.2)
        stop.set()
        poller.join()
    # Assert: the counter was seen climbing, one round at a time, to 4
    assert seen == sorted(seen) and seen[-1] == 4.0 and len(seen) >= 3, seen
    records = [
        json.loads(line) for line in (config.state_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    # ... and `fedpriv report` plots it
    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedpriv",
            "report",
            str(config.state_dir),
            "--out",
            str(tmp_path / "png"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    import matplotlib.image

    points = dict(line.rsplit(": ", 1) for line in report.stdout.splitlines())
    counts = {pathlib_name(k): int(v.split()[0]) for k, v in points.items()}
    # accuracy + loss for 4 rounds; epsilon of 2 silos for 4 rounds; 2 silos x 4 rounds
    assert counts == {"accuracy.png": 8, "epsilon.png": 8, "participation.png": 8}
    for name in counts:
        path = tmp_path / "png" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(path).shape[2] in (3, 4)


def pathlib_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]
