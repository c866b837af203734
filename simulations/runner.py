"""Run a scenario on Flower's Simulation Engine (Ray), in this process.

The ServerApp is silotune's own (``server.app.make_server_app``) with the
scenario's config; the ClientApp is the very one agents run in deployment.
Ray runs the virtual organizations in actors; each actor keeps one resident
base model for all the organizations it serves (clients/resident.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from clients.app import app as client_app
from clients.local_ray import keep_ray_on_loopback
from runtime import base_model
from server.app import make_server_app
from server.job import RoundObserver
from server.job_config import JobConfig
from simulations.scenario import Scenario

log = logging.getLogger("silotune.simulate")


def backend_config(scenario: Scenario) -> dict[str, Any]:
    cpus = os.cpu_count() or 1
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False},
    }
    for key, value in scenario.backend.items():
        backend.setdefault(key, {}).update(value)
    return backend


def run_scenario(scenario: Scenario, cfg: JobConfig, observer: RoundObserver | None = None) -> Path:
    """Run the federation; returns the run directory (report.json, specialist/)."""
    from flwr.simulation import run_simulation

    # Convert / fingerprint the base model once here, so the actors do not all
    # race to do it (they would wait on the same file lock).
    base_model.fingerprint(cfg.model)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    keep_ray_on_loopback()  # the simulation's Ray serves this process only
    run_simulation(
        server_app=make_server_app(cfg, observer),
        client_app=client_app,
        num_supernodes=scenario.num_organizations,
        backend_config=backend_config(scenario),
    )
    run_dir = Path(cfg.run_dir)
    if not (run_dir / "report.json").exists():
        raise RuntimeError(f"the simulation ended without a report in {run_dir}; see the log above")
    return run_dir
