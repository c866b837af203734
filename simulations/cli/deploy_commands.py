"""`silotune coordinator`: a real Flower deployment (the agent side: agent_commands.py).

coordinator: a SuperLink (state in SQLite under --state-dir) and, submitted to
it, the silotune ServerApp with the job's run config; it waits for the job,
prints the report, then stops the SuperLink it started (by PID).
agent: checks the silo file first (a bad file fails here, not in round 3),
then runs this organization's SuperNode until stopped.

Both are secure by default (TLS + node authentication, see server/pki.py and
server/enrollment.py):

- coordinator: the SuperLink serves TLS with `--pki-dir`'s server.pem /
  server.key (checked first: chain, dates, key, SAN for the address its own
  CLI dials) and runs `--enable-supernode-auth`; `--enroll ORG=ORG.pub`
  registers organizations as soon as the SuperLink is up (before the job is
  submitted); `silotune pki enroll` adds more while it runs.
- agent: `--ca-cert` (the federation's ca.pem) to verify the coordinator,
  `--private-key` (ORG.key from `silotune pki org-key`) to authenticate; a
  quick TLS handshake checks the coordinator's certificate against the CA
  before the SuperNode starts, so a wrong CA file is a named error here.

`--insecure` is an explicit opt-out (plain HTTP, any SuperNode accepted) for
local experiments; it prints a warning.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import ssl
import time
from pathlib import Path

from simulations.console import console, report_table
from simulations.scenario import load_scenario, parse_overrides

INSECURE_WARNING = ("[yellow]warning: --insecure: no TLS, no node authentication; anyone who can "
                    "reach the port can read the traffic and join (local experiments only)[/yellow]")
AGENT_NEEDS_KEYS = (
    "TLS and node authentication are on by default: pass --ca-cert (the federation's ca.pem) and "
    "--private-key (this organization's key, from `silotune pki org-key`), or --insecure to opt "
    "out (local experiments only)"
)


def register(commands: argparse._SubParsersAction) -> None:
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
    p.set_defaults(handler=coordinator)


def default_app_dir() -> Path:
    """The checkout this silotune runs from: the folder holding its pyproject.toml."""
    import server

    root = Path(server.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(f"no pyproject.toml in {root}; pass --app-dir (the silotune Flower App folder)")
    return root


def coordinator(args: argparse.Namespace) -> int:
    from server.enrollment import enroll, parse_enroll_arg
    from server.job_config import JobConfig
    from server.pki import coordinator_files, load_org_public_key
    from server.superlink import BIND_ALL, SuperLinkProcess
    from protos.flower_processes import LOCALHOST

    state_dir = Path(args.state_dir).resolve()
    run_config = dict(load_scenario(args.scenario).run_config) if args.scenario else {}
    run_config.update(parse_overrides(args.overrides))
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


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT (or [v6]:PORT) → (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--coordinator {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def check_coordinator_tls(address: str, ca_cert: Path, timeout: float = 5.0) -> bool:
    """One TLS handshake with the coordinator, verifying its certificate against `ca_cert`.

    True if it verified; False if the coordinator cannot be reached yet (the
    SuperNode will keep trying). A certificate from another CA, one without
    this host among its names, or a coordinator that does not speak TLS is a
    named PkiError now rather than a retry loop in the SuperNode's log.
    """
    from server.pki import PkiError, PkiHostMismatch, PkiWrongCA

    host, port = split_address(address)
    context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return True
    except ssl.SSLCertVerificationError as err:
        if err.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
            raise PkiHostMismatch(f"the coordinator's certificate at {address} is not valid for "
                                  f"{host!r}: {err.verify_message}") from err
        raise PkiWrongCA(f"the coordinator at {address} presented a certificate that {ca_cert} "
                         f"does not vouch for ({err.verify_message}): is this the federation's ca.pem?") from err
    except ssl.SSLError as err:
        raise PkiError(f"TLS handshake with the coordinator at {address} failed ({err.reason or err}): "
                       "does it run --insecure? Then the agent needs --insecure too") from err
    except OSError:
        return False
