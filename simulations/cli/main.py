"""`silotune` — one command for the three ways in (see DESIGN.md).

  silotune simulate     a federation of virtual organizations (Flower Simulation Engine, Ray)
  silotune coordinator  a SuperLink + the silotune ServerApp for a job (deployment); --serve: a service
  silotune job          submit, list, watch, cancel jobs of a coordinator service (operator certificate)
  silotune specialist   list, show, fetch the specialists a coordinator service registered
  silotune agent start  an organization's resident trainer + SuperNode, next to its silo file
  silotune agent check  validate and summarize a silo file before joining
  silotune export       the specialist from a run's checkpoints, as a PEFT adapter folder
  silotune eval         score a base model (or base + adapter) on a silo file
  silotune generate     answer a prompt with a specialist
  silotune pki          CA, coordinator certificate, organization keys, enrollment
"""

from __future__ import annotations

import argparse
import logging
import sys

from clients.cli import agent, model
from server.cli import coordinator, export, jobs, pki
from simulations.cli import simulate_command


def build_parser() -> argparse.ArgumentParser:
    # Each side registers its own commands (server/cli/, clients/cli/); the order is `--help`'s.
    parser = argparse.ArgumentParser(prog="silotune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    simulate_command.register(commands)
    coordinator.register(commands, read_run_config=simulate_command.scenario_run_config)
    jobs.register(commands, read_run_config=simulate_command.scenario_run_config)
    agent.register(commands)
    export.register(commands)
    model.register(commands)
    pki.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("alembic", "filelock", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Flower prints through its own handler; without this every line shows twice.
    logging.getLogger("flwr").propagate = False
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, FileNotFoundError, FileExistsError) as err:
        # Named, user-facing errors (bad silo, bad scenario, quorum...) without a traceback.
        print(f"silotune {args.command}: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
