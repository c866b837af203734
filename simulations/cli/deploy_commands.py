"""`silotune coordinator` and `silotune agent`: a real Flower deployment.

coordinator: a SuperLink (state in SQLite under --state-dir) and, submitted to
it, the silotune ServerApp with the job's run config; it waits for the job,
prints the report, then stops the SuperLink it started (by PID).
agent: checks the silo file first (a bad file fails here, not in round 3),
then runs this organization's SuperNode until stopped.

TLS and node authentication are the security issue's work and not built yet:
both commands insist on an explicit ``--insecure`` until then.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path

from simulations.console import console, report_table
from simulations.scenario import load_scenario, parse_overrides

INSECURE_REQUIRED = (
    "TLS and node authentication are not built yet; pass --insecure to run "
    "without them (local experiments only)"
)


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("coordinator", help="run a SuperLink and the silotune ServerApp for a job")
    p.add_argument("--insecure", action="store_true", help="no TLS, no node auth (required for now)")
    p.add_argument("--state-dir", default="runs/coordinator", help="SuperLink database, logs, checkpoints")
    p.add_argument("--port", type=int, help="SuperLink port on 127.0.0.1 (default: a free one)")
    p.add_argument("--scenario", help="take the run config from a scenario file (its run-config section)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--app-dir", help="the Flower App folder (default: this silotune checkout)")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up on the run after this long")
    p.set_defaults(handler=coordinator)

    p = commands.add_parser("agent", help="run an organization's SuperNode next to its silo file")
    p.add_argument("--insecure", action="store_true", help="no TLS, no node auth (required for now)")
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator's SuperLink")
    p.add_argument("--data", required=True, help="this organization's silo file (.jsonl, .csv, .parquet)")
    p.add_argument("--name", help="organization name shown in the coordinator's report")
    p.add_argument("--state-dir", help="logs and Flower state (default: runs/agent-<name>)")
    p.set_defaults(handler=agent)


def default_app_dir() -> Path:
    """The checkout this silotune runs from: the folder holding its pyproject.toml."""
    import server

    root = Path(server.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(f"no pyproject.toml in {root}; pass --app-dir (the silotune Flower App folder)")
    return root


def coordinator(args: argparse.Namespace) -> int:
    if not args.insecure:
        raise RuntimeError(INSECURE_REQUIRED)
    from server.job_config import JobConfig
    from server.superlink import SuperLinkProcess

    console.print("[yellow]warning: --insecure: no TLS, no node authentication[/yellow]")
    state_dir = Path(args.state_dir).resolve()
    run_config = dict(load_scenario(args.scenario).run_config) if args.scenario else {}
    run_config.update(parse_overrides(args.overrides))
    run_config.setdefault("run-dir", str(state_dir / "run"))
    cfg = JobConfig.from_run_config(run_config)  # refuse a bad config before starting anything
    with SuperLinkProcess().start(state_dir, insecure=True, port=args.port) as superlink:
        console.print(f"SuperLink pid {superlink.pid} listening on {superlink.address}; "
                      f"agents: silotune agent --insecure --coordinator {superlink.address} --data FILE")
        run_id = superlink.submit_run(args.app_dir or default_app_dir(), run_config)
        console.print(f"job {cfg.job_id}: run {run_id} submitted; waiting for {cfg.min_nodes} organization(s)")
        status = superlink.wait_for_run(run_id, timeout=args.timeout)
        logs = superlink.run_logs(run_id)
        (state_dir / f"run-{run_id}.log").write_text(logs)
        if not status.endswith("completed"):
            console.print(logs[-4000:])
            raise RuntimeError(f"run {run_id} ended {status}; full log in {state_dir}/run-{run_id}.log")
    report = json.loads((Path(cfg.run_dir) / "report.json").read_text())
    console.print(report_table(report))
    console.print(f"specialist: {report['specialist']}")
    return 0


def agent(args: argparse.Namespace) -> int:
    if not args.insecure:
        raise RuntimeError(INSECURE_REQUIRED)
    from clients.silo import load_silo
    from clients.supernode import SuperNodeProcess

    data = Path(args.data).resolve()
    silo = load_silo(data)  # named SiloError now rather than inside a round
    name = args.name or data.stem
    console.print(f"[yellow]warning: --insecure: no TLS, no node authentication[/yellow]")
    console.print(f"organization {name}: {len(silo)} {silo.task} examples in {data} (they stay here)")
    state_dir = Path(args.state_dir or f"runs/agent-{name}").resolve()
    stop = {"now": False}

    def request_stop(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    with SuperNodeProcess().start(args.coordinator, {"silo-path": str(data), "org-name": name},
                                  state_dir, insecure=True) as supernode:
        console.print(f"SuperNode pid {supernode.pid} → {args.coordinator}; Ctrl-C to leave the federation")
        while not stop["now"] and supernode.exited is None:
            time.sleep(0.5)
        if supernode.exited is not None:
            raise RuntimeError(f"SuperNode exited with code {supernode.exited}:\n{supernode.log_tail()}")
    return 0
