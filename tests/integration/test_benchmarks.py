"""The benchmarks run in smoke mode so they never rot."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_round_bench_smoke_prints_its_table():
    result = subprocess.run(
        [sys.executable, "benchmarks/round_bench.py", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    header, row = result.stdout.strip().splitlines()[-2:]
    assert "median round s" in header and "coord peak RSS MB" in header
    fields = row.split()
    assert fields[0] == "10,000" and fields[1] == "2"
    assert float(fields[3]) > 0 and float(fields[4]) > 0.03  # 40 kB sent per round
