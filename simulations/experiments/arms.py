"""One arm of an experiment: run it once, keep it, read it back.

Each arm's run directory (the scenario's ``run-dir``: report.json, checkpoints,
specialist) is kept, so an interrupted experiment resumes where it stopped and a
finished arm is never run again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from simulations.runner import run_scenario
from simulations.scenario import Scenario

WALL_FILE = "wall_seconds.txt"


def run_once(scenario: Scenario, *, report_only: bool = False) -> tuple[dict[str, Any], float] | None:
    """(report.json, wall seconds of the run that made it); runs the scenario only when its
    run dir holds no report yet. ``report_only``: None instead of running."""
    run_dir = Path(scenario.run_config["run-dir"])
    report_path = run_dir / "report.json"
    if not report_path.exists():
        if report_only:
            return None
        started = time.perf_counter()
        run_scenario(scenario, scenario.job_config())
        (run_dir / WALL_FILE).write_text(f"{time.perf_counter() - started:.0f}\n")
    return json.loads(report_path.read_text()), float((run_dir / WALL_FILE).read_text())
