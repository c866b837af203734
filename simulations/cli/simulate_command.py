"""`silotune simulate`: run a scenario on the Simulation Engine and print the table.

Also the scenario reader `silotune coordinator --scenario` borrows
(`scenario_run_config`): scenario files are the simulation's format.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from runtime.console import console
from server.cli.report_table import report_table
from simulations.console import RichObserver
from simulations.scenario import load_scenario, parse_overrides


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("simulate", help="run N virtual organizations on Flower's Simulation Engine (Ray)")
    p.add_argument("--scenario", default="demo", help="built-in name (demo, qa, tiny) or a .yaml file")
    p.add_argument("--organizations", type=int, help="override num-organizations")
    p.add_argument("--rounds", type=int, help="override num-rounds")
    p.add_argument("--run-dir", help="where checkpoints, the specialist and report.json go")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any run-config key (repeatable), e.g. --set local-steps=20")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.scenario)
    overrides = parse_overrides(args.overrides)
    if args.organizations:
        scenario.num_organizations = args.organizations
        overrides.setdefault("min-nodes", min(args.organizations, scenario.job_config().min_nodes))
    if args.rounds:
        overrides["num-rounds"] = args.rounds
    overrides["run-dir"] = args.run_dir or overrides.get("run-dir") or f"runs/{scenario.name}"
    cfg = scenario.job_config(overrides)
    console.print(f"[bold]silotune simulate[/bold] {scenario.name}: {scenario.description}")
    console.print(f"  {scenario.num_organizations} organizations, model {cfg.model}, {cfg.num_rounds} rounds, "
                  f"strategy {cfg.strategy}, run dir {cfg.run_dir}")
    from simulations.runner import run_scenario  # heavy imports (ray, torch) after arguments are checked

    started = time.perf_counter()
    run_dir = run_scenario(scenario, cfg, RichObserver())
    wall = time.perf_counter() - started
    report = json.loads((Path(run_dir) / "report.json").read_text())
    console.print(report_table(report))
    console.print(f"wall time {wall:.0f}s · specialist: {report['specialist']} · "
                  f"report: {run_dir}/report.json · curve: {run_dir}/learning_curve.png")
    return 0


def scenario_run_config(scenario: str | None, overrides: list[str]) -> dict[str, Any]:
    """The run config of `--scenario` (its run-config section; {} without one) updated by `--set` pairs."""
    run_config = dict(load_scenario(scenario).run_config) if scenario else {}
    run_config.update(parse_overrides(overrides))
    return run_config
