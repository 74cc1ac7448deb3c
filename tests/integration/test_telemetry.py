"""The coordinator's Prometheus endpoint during a run, its JSONL log, and `fedpriv report`."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import urllib.request

import numpy as np

from fedpriv.client import FitResult
from fedpriv.coordinator import Coordinator
from tests.conftest import ArrayClient
from tests.helpers import CollectingReporter, make_config, silo_thread, wait_silos
from tests.integration.test_processes import ROOT


class ReportingClient(ArrayClient):
    """Reports a growing sample-level epsilon, as a DP silo's runtime does."""

    def fit(self, parameters, *, config):
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


class ScrapingReporter(CollectingReporter):
    """Scrapes the rounds counter each time a round is reported."""

    def __init__(self) -> None:
        super().__init__()
        self.port = 0
        self.seen: list[float | None] = []

    def round_completed(self, summary) -> None:
        self.seen.append(scrape(self.port))
        super().round_completed(summary)


def test_prometheus_counter_advances_and_report_plots_every_round(tmp_path, pki):
    # Arrange
    config = dataclasses.replace(
        make_config(tmp_path, pki.root, {"w": np.zeros(8, np.float32)}, num_rounds=4),
        prometheus="127.0.0.1:0",
    )
    # Act: scrape the endpoint from the reporter, as each round is reported: the
    # exporter serves from its own thread, so it answers while the round loop waits.
    reporter = ScrapingReporter()
    with Coordinator(config, reporter=reporter) as coordinator:
        reporter.port = coordinator.telemetry.port
        with (
            silo_thread(ReportingClient(), port=coordinator.port, tls=pki.tls("silo-a")) as a,
            silo_thread(ReportingClient(), port=coordinator.port, tls=pki.tls("silo-b")) as b,
        ):
            assert coordinator.wait(timeout_s=60)
            wait_silos([a, b])
    seen = reporter.seen
    # Assert: the counter was seen climbing, one round at a time, to 4
    assert seen == [1.0, 2.0, 3.0, 4.0], seen
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
