"""`silotune coordinator`: a real Flower deployment, the coordinator's side.

A SuperLink (state in SQLite under --state-dir) and, submitted to it, the
silotune ServerApp with the job's run config; it waits for the job, prints
the report, then stops the SuperLink it started (by PID). The organizations'
side is `silotune agent start` (clients/cli/agent.py).

Secure by default (TLS + node authentication, see server/pki.py and
server/enrollment.py): the SuperLink serves TLS with `--pki-dir`'s
server.pem / server.key (checked first: chain, dates, key, SAN for the
address its own CLI dials) and runs `--enable-supernode-auth`;
`--enroll ORG=ORG.pub` registers organizations as soon as the SuperLink is up
(before the job is submitted); `silotune pki enroll` adds more while it runs.

`--insecure` is an explicit opt-out (plain HTTP, any SuperNode accepted) for
local experiments; it prints a warning.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.console import INSECURE_WARNING, console
from server.cli.report_table import report_table

#: (--scenario or None, the --set pairs) → the job's run config. Scenario files
#: are the simulation's format (simulations/scenario.py), so the `silotune`
#: command that composes both sides passes the reader in; server/ never
#: imports simulations/.
RunConfigReader = Callable[[str | None, list[str]], dict[str, Any]]


def register(commands: argparse._SubParsersAction, read_run_config: RunConfigReader) -> None:
    p = commands.add_parser("coordinator", help="run a SuperLink and the silotune ServerApp for a job")
    p.add_argument("--pki-dir", default="pki",
                   help="ca.pem, server.pem, server.key from `silotune pki init/server-cert` (default ./pki)")
    p.add_argument("--enroll", action="append", default=[], metavar="ORG=PUBKEY",
                   help="enroll an organization's public key when the SuperLink is up (repeat)")
    p.add_argument("--insecure", action="store_true",
                   help="opt out of TLS and node authentication (local experiments only)")
    p.add_argument("--state-dir", default="runs/coordinator", help="SuperLink database, logs, checkpoints")
    p.add_argument("--bind", default="127.0.0.1",
                   help="address the SuperLink listens on (default 127.0.0.1; 0.0.0.0 for remote agents)")
    p.add_argument("--port", type=int, help="SuperLink port (default: a free one)")
    p.add_argument("--scenario", help="take the run config from a scenario file (its run-config section)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--app-dir", help="the Flower App folder (default: this silotune checkout)")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up on the run after this long")
    p.set_defaults(handler=coordinator, read_run_config=read_run_config)


def default_app_dir() -> Path:
    """The checkout this silotune runs from: the folder holding its pyproject.toml."""
    import server

    root = Path(server.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(f"no pyproject.toml in {root}; pass --app-dir (the silotune Flower App folder)")
    return root


def coordinator(args: argparse.Namespace) -> int:
    from runtime.flower_processes import LOCALHOST
    from runtime.keys import load_org_public_key
    from server.enrollment import enroll, parse_enroll_arg
    from server.job_config import JobConfig
    from server.pki import coordinator_files
    from server.superlink import BIND_ALL, SuperLinkProcess

    state_dir = Path(args.state_dir).resolve()
    run_config = args.read_run_config(args.scenario, args.overrides)
    run_config.setdefault("run-dir", str(state_dir / "run"))
    cfg = JobConfig.from_run_config(run_config)  # refuse a bad config before starting anything
    # Refuse bad security settings before starting anything too.
    to_enroll = [parse_enroll_arg(text) for text in args.enroll]
    if args.insecure:
        if to_enroll:
            raise ValueError("--enroll needs node authentication, which --insecure turns off")
        console.print(INSECURE_WARNING)
        tls = None
    else:
        dial_host = LOCALHOST if args.bind in BIND_ALL else args.bind
        tls = coordinator_files(args.pki_dir, hosts=[dial_host])
        for _, key_path in to_enroll:
            load_org_public_key(key_path)
    with SuperLinkProcess().start(state_dir, insecure=args.insecure, tls=tls, node_auth=tls is not None,
                                  host=args.bind, port=args.port) as superlink:
        if tls is None:
            console.print(f"SuperLink pid {superlink.pid} listening on {superlink.address} (plain HTTP); "
                          f"agents: silotune agent start --insecure --coordinator {superlink.address} --data FILE")
        else:
            for name, key_path in to_enroll:
                row = enroll(state_dir, name, key_path)
                console.print(f"enrolled {row.name}: node {row.node_id}, key {row.fingerprint}")
            console.print(
                f"SuperLink pid {superlink.pid} listening on {args.bind}:{superlink.port} (TLS, node auth); "
                f"agents: silotune agent start --coordinator HOST:{superlink.port} --ca-cert {tls.ca_cert} "
                f"--private-key ORG.key --data FILE; enroll more with: silotune pki enroll "
                f"--coordinator-dir {state_dir} --name ORG --public-key ORG.pub")
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
