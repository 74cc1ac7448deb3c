"""Run a Flower project as a local fedpriv federation (``fedpriv run PROJECT_DIR``)."""

from __future__ import annotations

from fedpriv.run.flower_project import (
    FlowerProject,
    fresh_run_dir,
    parse_run_config,
    run_flower_project,
)

__all__ = ["FlowerProject", "fresh_run_dir", "parse_run_config", "run_flower_project"]
