"""Run a scenario on Flower's Simulation Engine (Ray), in this process.

The ServerApp is silotune's own (``server.app.make_server_app``) with the
scenario's config; the ClientApp is the very one agents run in deployment.
Ray runs the virtual organizations in actors; each actor keeps one resident
base model for all the organizations it serves (clients/resident.py). That Ray
is a new local one bound to 127.0.0.1, or, with ``ray_address``, an existing
cluster the simulation connects to (its actors then run on every node).
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
from simulations.dispatch import delivering_in_one_scan
from simulations.scenario import Scenario

log = logging.getLogger("silotune.simulate")


#: ray.init arguments that size a new Ray; refused by ray.init when it joins an existing cluster
_CLUSTER_SHAPE = ("num_cpus", "num_gpus", "resources", "labels", "object_store_memory", "_system_config")


def backend_config(scenario: Scenario, ray_address: str | None = None) -> dict[str, Any]:
    """Flower's Ray backend config: a new local Ray of this machine's CPUs (``address="local"``, so a
    stray ``RAY_ADDRESS`` is not joined by accident), or the existing cluster at ``ray_address``."""
    cpus = os.cpu_count() or 1
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"address": "local", "num_cpus": cpus, "include_dashboard": False},
    }
    for key, value in scenario.backend.items():
        backend.setdefault(key, {}).update(value)
    if ray_address:
        # Flower's Ray backend passes init_args to ray.init (flwr/server/superlink/fleet/vce/backend/
        # raybackend.py): with an address it joins that cluster, whose nodes' resources size the actor pool.
        dropped = sorted(k for k in scenario.backend.get("init_args", {}) if k in _CLUSTER_SHAPE)
        if dropped:
            log.warning("joining the Ray cluster at %s: the scenario's init_args %s do not apply (the cluster's "
                        "nodes were started with their own resources)", ray_address, ", ".join(dropped))
        backend["init_args"] = {k: v for k, v in backend["init_args"].items() if k not in _CLUSTER_SHAPE}
        backend["init_args"]["address"] = ray_address
    return backend


class _WithoutRunSimulationDeprecation(logging.Filter):
    """Drops Flower 1.41's "DEPRECATED FEATURE: The `run_simulation` function is deprecated" record.

    Why we still call it: the replacement Flower names, ``flwr run`` on a
    simulation federation, loads the ServerApp and ClientApp by name from an
    app folder and talks to a SuperLink (``flwr.simulation.run_simulation_process``
    needs its SimulationIO API), so it cannot run the ServerApp object this
    module builds from a scenario with a round observer. When Flower ships an
    in-process entry point that takes app objects, call it and delete this
    filter. Only that one record is dropped; every other warning still shows.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (str(record.msg).lstrip().startswith("DEPRECATED FEATURE") and args
                    and str(args[0]).startswith("The `run_simulation` function is deprecated"))


def run_scenario(scenario: Scenario, cfg: JobConfig, observer: RoundObserver | None = None, *,
                 ray_address: str | None = None) -> Path:
    """Run the federation; returns the run directory (report.json, specialist/).

    ``ray_address``: run the virtual organizations on that existing Ray
    cluster (``ray start --head`` / ``ray.cluster_utils.Cluster``) instead of a
    new local Ray. Every node needs silotune's environment and the data paths.
    """
    from flwr.simulation import run_simulation

    # Convert / fingerprint the base model once here, so the actors do not all
    # race to do it (they would wait on the same file lock).
    base_model.fingerprint(cfg.model)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not ray_address:
        keep_ray_on_loopback()  # the simulation's own Ray serves this process only
    # Joining a cluster, Ray's node-address setting is left as it is: the driver must see itself at the
    # address the cluster's nodes were started with (127.0.0.1 for a loopback-only test cluster).
    flower_log = logging.getLogger("flwr")
    hide_deprecation = _WithoutRunSimulationDeprecation()
    flower_log.addFilter(hide_deprecation)
    try:
        # Flower's own extractor costs nodes × pending instructions a pass (simulations/dispatch.py)
        with delivering_in_one_scan():
            run_simulation(
                server_app=make_server_app(cfg, observer),
                client_app=client_app,
                num_supernodes=scenario.num_organizations,
                backend_config=backend_config(scenario, ray_address),
            )
    finally:
        flower_log.removeFilter(hide_deprecation)
    run_dir = Path(cfg.run_dir)
    if not (run_dir / "report.json").exists():
        raise RuntimeError(f"the simulation ended without a report in {run_dir}; see the log above")
    return run_dir
