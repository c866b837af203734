"""`silotune simulate`: run a scenario on the Simulation Engine and print the table.

`--data` runs the virtual organizations on the user's own silo file (split by
`--partitioner`) or folder of one file per organization, on the demo
scenario's settings unless `--scenario` names others; `--ray-address` runs
them on an existing Ray cluster instead of a new local Ray.

Also the scenario reader `silotune coordinator --scenario` borrows
(`scenario_run_config`): scenario files are the simulation's format.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from rich.markup import escape

from clients.silo.partition import (PARTITIONERS, is_silo_folder, organizations_in, parse_partitioner,
                                    partition_silos)
from protos.task_spec import TaskSpec
from runtime.console import console
from server.cli.report_table import report_table
from server.job_config import JobConfig
from simulations.console import RichObserver
from simulations.scenario import Scenario, load_scenario, parse_overrides

#: the scenario whose settings (model, rounds, LoRA shape, steps) `--data` runs with when no --scenario is named
DATA_BASE_SCENARIO = "demo"


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("simulate", help="run N virtual organizations on Flower's Simulation Engine (Ray)")
    p.add_argument("--scenario", help="built-in name (demo, qa, tiny) or a .yaml file (default: demo)")
    p.add_argument("--data", metavar="FILE|DIR",
                   help="your own data (sim-data): a silo file split among the organizations, or a folder of one "
                        "silo file per organization (sorted by name); every Ray node must see the path")
    p.add_argument("--partitioner", metavar="HOW",
                   help=f"how --data is split (sim-partitioner): {', '.join(PARTITIONERS)} (default iid)")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="run on this existing Ray cluster (e.g. 10.0.0.5:6379, as `ray start --head` prints) "
                        "instead of a new local Ray; RAY_ADDRESS alone is not used")
    p.add_argument("--organizations", type=int, help="override num-organizations")
    p.add_argument("--rounds", type=int, help="override num-rounds")
    p.add_argument("--run-dir", help="where checkpoints, the specialist and report.json go")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any run-config key (repeatable), e.g. --set local-steps=20")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.scenario or DATA_BASE_SCENARIO)
    overrides = parse_overrides(args.overrides)
    if args.partitioner:
        overrides["sim-partitioner"] = str(parse_partitioner(args.partitioner))
    organizations = args.organizations
    if args.data:
        use_own_data(scenario, overrides, args.data, named_scenario=bool(args.scenario))
        # a folder (one file each) or by:COLUMN (one value each) says how many organizations there are
        partitioner = overrides.get("sim-partitioner", scenario.run_config.get("sim-partitioner", "iid"))
        organizations = organizations or organizations_in(overrides["sim-data"], str(partitioner))
    elif overrides.get("sim-data"):
        overrides["sim-data"] = str(Path(str(overrides["sim-data"])).expanduser().resolve())
    if organizations:
        scenario.num_organizations = organizations
        overrides.setdefault("min-nodes", min(organizations, scenario.job_config().min_nodes))
    if args.rounds:
        overrides["num-rounds"] = args.rounds
    overrides["run-dir"] = args.run_dir or overrides.get("run-dir") or f"runs/{scenario.name}"
    cfg = scenario.job_config(overrides)
    if args.partitioner and not cfg.sim_data:
        raise ValueError("--partitioner splits your own data: add --data FILE (or --set sim-data=FILE)")
    console.print(f"[bold]silotune simulate[/bold] {scenario.name}: {scenario.description}")
    console.print(f"  {scenario.num_organizations} organizations, model {cfg.model}, {cfg.num_rounds} rounds, "
                  f"strategy {cfg.strategy}, run dir {cfg.run_dir}")
    if cfg.sim_data:
        check_own_data(cfg, scenario.num_organizations)
    if args.ray_address:
        console.print(f"  on the Ray cluster at {args.ray_address}")
    from simulations.runner import run_scenario  # heavy imports (ray, torch) after arguments are checked

    started = time.perf_counter()
    run_dir = run_scenario(scenario, cfg, RichObserver(), ray_address=args.ray_address)
    wall = time.perf_counter() - started
    report = json.loads((Path(run_dir) / "report.json").read_text())
    console.print(report_table(report))
    console.print(f"wall time {wall:.0f}s · specialist: {report['specialist']} · "
                  f"report: {run_dir}/report.json · curve: {run_dir}/learning_curve.png")
    return 0


def use_own_data(scenario: Scenario, overrides: dict[str, Any], data: str, *, named_scenario: bool) -> None:
    """Point the scenario at ``data`` (made absolute: Ray's workers do not run in this directory)."""
    path = Path(data).expanduser().resolve()
    overrides["sim-data"] = str(path)
    if not named_scenario:  # the demo's settings, but nothing of its BBC News job
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-") or "data"
        scenario.name = stem
        scenario.description = f"your data ({escape(str(path))})"
        overrides.setdefault("job-id", f"sim-{stem}")


def check_own_data(cfg: JobConfig, organizations: int) -> None:
    """Split the data here, before Ray starts: a bad file or partitioner fails now, with its named error.

    The organizations do the same split themselves (clients/local_data.py), from the same file."""
    silos = partition_silos(cfg.sim_data, organizations, cfg.sim_partitioner, seed=cfg.seed,
                            spec=TaskSpec.from_config(cfg))
    how = f"split {cfg.sim_partitioner}"
    if is_silo_folder(cfg.sim_data):
        how = "one file per organization" + ("; the partitioner is not used" if cfg.sim_partitioner != "iid" else "")
    console.print(f"  your data: {cfg.sim_data} ({how}; {silos[0].task}): "
                  f"{', '.join(str(len(silo)) for silo in silos)} examples"
                  + (f"; labels {', '.join(silos[0].labels)}" if silos[0].labels else ""), markup=False)


def scenario_run_config(scenario: str | None, overrides: list[str]) -> dict[str, Any]:
    """The run config of `--scenario` (its run-config section; {} without one) updated by `--set` pairs."""
    run_config = dict(load_scenario(scenario, simulated=False).run_config) if scenario else {}
    run_config.update(parse_overrides(overrides))
    return run_config
