"""`silotune coordinator`: a real Flower deployment, the coordinator's side.

A SuperLink (state in SQLite under --state-dir) and, once min-nodes organizations
are online, the silotune ServerApp submitted to it with the job's run config; it
waits for the job, prints the report, then stops the SuperLink it started (by
PID). The organizations' side is `silotune agent start` (clients/cli/agent.py).

Secure by default (TLS + node authentication, see server/pki.py and
server/enrollment.py): the SuperLink serves TLS with `--pki-dir`'s
server.pem / server.key (checked first: chain, dates, key, SAN for the
address its own CLI dials) and runs `--enable-supernode-auth`;
`--enroll ORG=ORG.pub` registers organizations as soon as the SuperLink is up
(before the job is submitted); `silotune pki enroll` adds more while it runs.

The control plane is the operator's only (server/gateway.py): the SuperLink
listens on 127.0.0.1, where its port serves Fleet, Control and Runtime APIs;
`--bind/--port` is the gateway, which forwards the Fleet API alone (TLS with
the same certificate, so agents are unchanged) and refuses the Control and
Runtime APIs. An authenticated operator is someone on this host (the `flwr`
CLI and `silotune pki enroll/revoke/list` dial the SuperLink over loopback)
or, with `--operator-port`, someone holding an operator certificate
(`silotune pki operator-cert`): that listener demands it in the TLS
handshake and forwards the Control API alone. `silotune operator-tunnel`,
on the operator's machine, carries the `flwr` CLI to it.

`--insecure` is an explicit opt-out (plain HTTP, any SuperNode accepted) for
local experiments; it prints a warning. The gateway still forwards the
Fleet API only; there is no operator listener without TLS.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.console import INSECURE_WARNING, console
from runtime.flower_processes import BIND_ALL, LOCALHOST
from runtime.keys import load_org_public_key
from server.cli.report_table import report_table
from server.cli.round_table import render_event
from server.checkpoint import last_valid_round
from server.enrollment import enroll, parse_enroll_arg
from server.events import EVENTS_FILE, Event, EventsFollower
from server.exchange import NODE_POLL_SECONDS, wait_for_nodes
from server.gateway import FLEET, OPERATOR, GatewayProcess, Listener
from server.job_config import JobConfig
from server.pki import ServerFiles, coordinator_files
from server.superlink import LOOPBACK, SuperLinkProcess

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
                   help="address the gateway listens on for agents, Fleet API only (default 127.0.0.1; "
                        "0.0.0.0 for remote agents); the SuperLink itself listens on 127.0.0.1 only")
    p.add_argument("--port", type=int, help="the gateway's port for agents (default: a free one)")
    p.add_argument("--operator-port", type=int,
                   help="also serve the Control API to remote operators on this port, mutual TLS with an "
                        "operator certificate (`silotune pki operator-cert`); default: off, operators work "
                        "on this host")
    p.add_argument("--operator-bind", help="address of the operator listener (default: --bind)")
    p.add_argument("--max-request-mib", type=int, default=64,
                   help="largest request body the gateway forwards, MiB (default 64; Flower sends arrays "
                        "in 5 MiB chunks)")
    p.add_argument("--scenario", help="take the run config from a scenario file (its run-config section)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--app-dir", help="the Flower App folder (default: this silotune checkout)")
    p.add_argument("--unsigned-app", action="store_true",
                   help="submit the app without a signature (silotune-app.sig.json, `silotune pki sign-app`); "
                        "only agents started with --unsigned-apps or --insecure will run it")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up on the run after this long")
    p.add_argument("--serve", action="store_true",
                   help="run as a service until SIGINT/SIGTERM: jobs come from operators through the jobs API "
                        "(`silotune job submit`), one at a time; each finished job is registered as a specialist")
    p.add_argument("--api-port", type=int,
                   help="with --serve: the jobs API's port (gRPC, mutual TLS with operator certificates; "
                        "0: a free one)")
    p.add_argument("--api-bind", help="with --serve: address of the jobs API (default: --bind)")
    p.add_argument("--dashboard-port", type=int, help="with --serve: also serve the dashboard on this port")
    p.set_defaults(handler=coordinator, read_run_config=read_run_config)

    p = commands.add_parser(
        "operator-tunnel",
        help="on an operator's machine: carry the `flwr` CLI to a coordinator's operator listener (mTLS)")
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT",
                   help="the coordinator's operator listener (`silotune coordinator --operator-port`)")
    p.add_argument("--ca-cert", required=True, help="the federation's ca.pem")
    p.add_argument("--cert", required=True, help="your operator certificate (operator-NAME.pem)")
    p.add_argument("--key", required=True, help="its private key (operator-NAME.key)")
    p.add_argument("--port", type=int, help="local port on 127.0.0.1 (default: a free one)")
    p.add_argument("--state-dir", default="runs/operator-tunnel",
                   help="where the `flwr` connection (flwr-home/config.toml) is written")
    p.set_defaults(handler=operator_tunnel)


def default_app_dir() -> Path:
    """The checkout this silotune runs from: the folder holding its pyproject.toml."""
    import server

    root = Path(server.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(f"no pyproject.toml in {root}; pass --app-dir (the silotune Flower App folder)")
    return root


def check_app(app_dir: Path, *, unsigned_ok: bool) -> None:
    """Refuse to submit an app folder that no longer matches its signature file (agents would refuse
    its bundle), or an unsigned one unless `unsigned_ok` (--unsigned-app, --insecure): then a warning."""
    from rich.markup import escape

    from runtime.app_signature import AppUnsigned, check_app_dir

    try:
        signature = check_app_dir(app_dir)
    except AppUnsigned as err:
        if not unsigned_ok:
            raise AppUnsigned(f"{err}; or pass --unsigned-app (only agents started with --unsigned-apps "
                              "will run it)") from None
        console.print(f"[yellow]warning: {escape(str(err))}. Only agents started with --unsigned-apps or "
                      "--insecure run it[/yellow]")
        return
    console.print(f"app {app_dir}: {len(signature.files)} files signed by publisher key "
                  f"{signature.key_fingerprint} (agents: --app-publisher-key with that key)")


def coordinator(args: argparse.Namespace) -> int:
    if args.serve:
        return serve(args)
    state_dir = Path(args.state_dir).resolve()
    run_config = args.read_run_config(args.scenario, args.overrides)
    run_config.setdefault("run-dir", str(state_dir / "run"))
    # the ServerApp runs in Flower's process, whose working directory is the SuperLink's (the
    # state dir): an absolute run dir is where this process reads the events and the report
    run_config["run-dir"] = str(Path(str(run_config["run-dir"])).expanduser().resolve())
    cfg = JobConfig.from_run_config(run_config)  # refuse a bad config before starting anything
    plane = check_plane(args)  # refuse bad security settings before starting anything too
    app_dir = Path(args.app_dir).resolve() if args.app_dir else default_app_dir()
    check_app(app_dir, unsigned_ok=args.insecure or args.unsigned_app)  # what the agents will check
    with ExitStack() as stack:
        superlink = start_plane(stack, args, state_dir, plane)
        if last_valid_round(cfg.checkpoint_dir) < cfg.num_rounds:
            console.print(f"job {cfg.job_id}: waiting for {cfg.min_nodes} organization(s) to come online "
                          f"(min-nodes, up to node-wait-timeout={cfg.node_wait_timeout:g}s); then its run is "
                          "submitted")
        wait_for_agents(superlink, cfg)
        # the rounds as they happen: the job's events file as tables, from now on (a resumed job's
        # earlier rounds are not repeated), and the ServerApp's log for everything else
        rounds = EventsFollower(Path(cfg.run_dir) / EVENTS_FILE, show_event)
        run_id = superlink.submit_run(app_dir, run_config)
        console.print(f"job {cfg.job_id}: run {run_id} submitted")
        follower = superlink.follow_run_log(run_id, lambda line: relay_log_line(line, tables_shown=rounds.grown()))
        try:
            status = superlink.wait_for_run(run_id, timeout=args.timeout)
        finally:
            follower.stop()
            rounds.stop()
        logs = superlink.run_logs(run_id)
        (state_dir / f"run-{run_id}.log").write_text(logs)
        if not status.endswith("completed"):
            console.print(logs[-4000:], markup=False)  # the run's log holds text from the network
            raise RuntimeError(f"run {run_id} ended {status}; full log in {state_dir}/run-{run_id}.log")
    report = json.loads((Path(cfg.run_dir) / "report.json").read_text())
    console.print(report_table(report))
    console.print(f"specialist: {report['specialist']}")
    return 0


class OnlineNodes:
    """The SuperLink's online SuperNodes as server/exchange.py's ``wait_for_nodes`` asks a Grid for them."""

    def __init__(self, superlink: SuperLinkProcess) -> None:
        self.superlink = superlink

    def get_node_ids(self) -> list[int]:
        return self.superlink.online_node_ids()


def wait_for_agents(superlink: SuperLinkProcess, cfg: JobConfig) -> list[int]:
    """Wait until min-nodes organizations are online, then return their node ids; QuorumError
    (the job's own, same words) after node-wait-timeout.

    Before this the job's run is not submitted: a submitted run is a ServerApp process asking
    the SuperLink who is online, and a `flwr log --stream` that has the SuperLink read its
    database every 0.5 s, for as long as the agents take to come (issue 14: under 2% of a core
    while waiting). One in-process Control API call every NODE_POLL_SECONDS costs nearly nothing.
    The job still waits for its nodes itself, so agents that leave meanwhile are waited for again.
    A job whose checkpoints hold its last round already (restarted after it finished, to export
    again) needs no organization: no wait, an empty list."""
    if last_valid_round(cfg.checkpoint_dir) >= cfg.num_rounds:
        return []
    return wait_for_nodes(OnlineNodes(superlink), cfg.min_nodes, cfg.node_wait_timeout,
                          NODE_POLL_SECONDS)


@dataclass(frozen=True)
class Plane:
    """The checked security settings of the SuperLink and the gateway."""

    tls: ServerFiles | None            # None: --insecure
    to_enroll: list[tuple[str, Path]]  # --enroll ORG=PUBKEY
    operator_bind: str


def check_plane(args: argparse.Namespace, extra_hosts: Sequence[str] = ()) -> Plane:
    """--insecure, --enroll, --operator-port and the PKI files, checked before anything starts.
    The server certificate must also name ``extra_hosts`` (the jobs API's address)."""
    to_enroll = [parse_enroll_arg(text) for text in args.enroll]
    operator_bind = args.operator_bind or args.bind
    if args.max_request_mib < 1:
        raise ValueError("--max-request-mib must be at least 1")
    if args.insecure:
        if to_enroll:
            raise ValueError("--enroll needs node authentication, which --insecure turns off")
        if args.operator_port:
            raise ValueError("--operator-port needs TLS (mutual TLS with operator certificates), "
                             "which --insecure turns off; operate from this host instead")
        console.print(INSECURE_WARNING)
        return Plane(None, [], operator_bind)
    # The SuperLink and its CLI are on loopback; agents dial --bind unless it binds every address.
    tls = coordinator_files(args.pki_dir, hosts=dialled_hosts([args.bind, operator_bind, *extra_hosts]))
    for _, key_path in to_enroll:
        load_org_public_key(key_path)
    return Plane(tls, to_enroll, operator_bind)


def dialled_hosts(binds: Sequence[str]) -> list[str]:
    """The hosts a server certificate must name: loopback, and each bind address that is not
    loopback or every address (those are dialled as 127.0.0.1)."""
    return [LOCALHOST] + [h for h in dict.fromkeys(binds) if h not in BIND_ALL and h not in LOOPBACK]


def start_plane(stack: ExitStack, args: argparse.Namespace, state_dir: Path, plane: Plane) -> SuperLinkProcess:
    """The SuperLink (loopback) and the gateway, stopped by PID when ``stack`` closes; enrolls
    --enroll's organizations and prints how agents and operators connect."""
    tls = plane.tls
    listeners = [Listener(FLEET, args.bind, args.port or 0)]
    if args.operator_port:
        listeners.append(Listener(OPERATOR, plane.operator_bind, args.operator_port))
    superlink = stack.enter_context(SuperLinkProcess().start(
        state_dir, insecure=tls is None, tls=tls, node_auth=tls is not None, host=LOCALHOST))
    scheme = "http" if tls is None else "https"
    gateway = stack.enter_context(GatewayProcess().start(
        state_dir, f"{scheme}://{superlink.address}", listeners, tls=tls,
        upstream_ca=tls.ca_cert if tls is not None else None,
        max_request_bytes=args.max_request_mib * 1024 * 1024))
    public = gateway.listener(FLEET)
    assert public is not None
    console.print(f"SuperLink pid {superlink.pid} on {superlink.address} (loopback only: Fleet, Control "
                  f"and Runtime APIs); gateway pid {gateway.pid} on {args.bind}:{public.port} "
                  f"(Fleet API only{'' if tls is None else ', TLS'})")
    operator_line = (f"operators: on this host (silotune pki enroll|revoke|list --coordinator-dir "
                     f"{state_dir}; FLWR_HOME={state_dir / 'flwr-home'} flwr ls)")
    op = gateway.listener(OPERATOR)
    if op is not None:
        operator_line += (f", or remotely with an operator certificate at {plane.operator_bind}:{op.port} "
                          "(mutual TLS; silotune operator-tunnel)")
    if tls is None:
        console.print(f"plain HTTP; agents: silotune agent start --insecure --coordinator "
                      f"{public.address} --data FILE")
    else:
        for name, key_path in plane.to_enroll:
            row = enroll(state_dir, name, key_path)
            console.print(f"enrolled {row.name}: node {row.node_id}, key {row.fingerprint}")
        console.print(
            f"agents (TLS, node auth): silotune agent start --coordinator HOST:{public.port} "
            f"--ca-cert {tls.ca_cert} --private-key ORG.key --data FILE; enroll more with: "
            f"silotune pki enroll --coordinator-dir {state_dir} --name ORG --public-key ORG.pub")
    console.print(operator_line)
    return superlink


def serve(args: argparse.Namespace) -> int:
    """`coordinator --serve`: the SuperLink, the gateway, the job manager and the jobs API until
    SIGINT or SIGTERM. Jobs come from operators (server/cli/jobs.py). On the way out the API
    stops, then the manager (a running job stays `running` in state_dir/jobs.sqlite and resumes
    from its checkpoint at the next start), then the gateway and the SuperLink, by PID.

    The jobs API is mutual TLS whatever --insecure says (--insecure is the agents' side: plain
    HTTP and no node authentication): it needs --pki-dir's CA and server certificate, and
    operators need an operator certificate (`silotune pki operator-cert`)."""
    import signal
    import threading

    from server.service.api import JobsApi
    from server.service.manager import JobManager

    if args.scenario or args.overrides:
        raise ValueError("--serve takes its jobs from operators (silotune job submit --scenario/--set); "
                         "--scenario and --set belong to the one-job mode")
    if args.api_port is None:
        raise ValueError("--serve needs --api-port (the jobs API's port; 0 for a free one)")
    state_dir = Path(args.state_dir).resolve()
    api_bind = args.api_bind or args.bind
    plane = check_plane(args, extra_hosts=[api_bind])
    api_tls = plane.tls or coordinator_files(args.pki_dir, hosts=dialled_hosts([api_bind]))
    app_dir = Path(args.app_dir).resolve() if args.app_dir else default_app_dir()
    check_app(app_dir, unsigned_ok=args.insecure or args.unsigned_app)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ExitStack() as stack:   # closes in reverse: API, dashboard, manager, gateway, SuperLink
            superlink = start_plane(stack, args, state_dir, plane)
            manager = JobManager(state_dir, superlink, app_dir).start()
            stack.callback(manager.stop)
            if args.dashboard_port is not None:
                # the operator's, like the jobs API: mutual TLS whatever --insecure says of the agents' side
                dashboard = start_dashboard(state_dir, api_bind, args.dashboard_port, api_tls)
                stack.callback(dashboard.stop)
            api = JobsApi(manager, api_tls, api_bind, args.api_port).start()
            stack.callback(api.stop)
            print_operator_commands(api_bind, api.port, api_tls)
            stop.wait()
            console.print("stopping: the jobs API, the job manager (a running job resumes at the next start), "
                          "the gateway and the SuperLink")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def start_dashboard(state_dir: Path, host: str, port: int, tls: ServerFiles | None) -> Any:
    """server/dashboard/'s DashboardServer (read-only: jobs.sqlite, the registry, events files)."""
    from server.dashboard.server import DashboardServer

    dashboard = DashboardServer(state_dir, host, port, tls).start()
    console.print(f"dashboard on {dashboard.url} ("
                  + ("mutual TLS, operator certificates" if tls else "plain HTTP, this host only") + ")")
    return dashboard


def print_operator_commands(host: str, port: int, tls: ServerFiles) -> None:
    shown = LOCALHOST if host in BIND_ALL else host
    console.print(f"jobs API on {host}:{port} (gRPC, mutual TLS: operator certificates only). Operators:")
    console.print(f"  (once) silotune pki operator-cert --dir {tls.ca_cert.parent} --name NAME", markup=False)
    console.print(f"  export SILOTUNE_API={shown}:{port} SILOTUNE_CA_CERT={tls.ca_cert} "
                  "SILOTUNE_OPERATOR_CERT=operator-NAME.pem SILOTUNE_OPERATOR_KEY=operator-NAME.key", markup=False)
    console.print("  silotune job submit --specialist NAME --scenario FILE.yaml [--set key=value ...] "
                  "[--continue NAME[:V]]", markup=False)
    console.print("  silotune job ls | watch JOB | cancel JOB", markup=False)
    console.print("  silotune specialist ls | show NAME[:V] | fetch NAME[:V] --out DIR", markup=False)
    console.print("Ctrl-C or SIGTERM stops the service; a running job resumes at the next start.")


def show_event(event: Event) -> None:
    """Print one round event as `silotune simulate` does (server/cli/round_table.py)."""
    for renderable in render_event(event):
        console.print(renderable)


#: the round log's lines (server/job.py's LogObserver) that the events show as well: a round
#: sampled, an update accepted, a round done. Information lines only: a warning (a rejection,
#: a retry) is always relayed, so no text from the network can hide one.
ROUND_LOG_LINE = re.compile(
    r" INFO silotune\.server: round \d+(: \d+ organization\(s\) sampled\s*$| done: |: .* accepted )")


def relay_log_line(line: str, *, tables_shown: bool) -> None:
    """One line of the ServerApp's log (text from the network, so no markup). Once the events
    file is showing the rounds, the log's own lines for the same events are left out."""
    if tables_shown and ROUND_LOG_LINE.search(line):
        return
    console.print(f"  {line}", markup=False, highlight=False)


TUNNEL_CONNECTION = "coordinator"  # the `flwr` connection `operator-tunnel` writes


def operator_tunnel(args: argparse.Namespace) -> int:
    """Serve the `flwr` CLI on 127.0.0.1 and forward its Control API calls to the coordinator's
    operator listener, presenting the operator certificate (the `flwr` CLI cannot present one)."""
    from runtime.flower_processes import LOCALHOST, free_port
    from runtime.keys import load_ca
    from server.gateway import TUNNEL, Listener, build_servers, run, serve
    from server.pki import verify_operator_cert

    host, sep, port = args.coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--coordinator {args.coordinator!r}: expected HOST:PORT")
    load_ca(args.ca_cert)
    name = verify_operator_cert(args.ca_cert, args.cert, args.key)
    local = Listener(TUNNEL, LOCALHOST, args.port or free_port())
    servers = build_servers([local], f"https://{args.coordinator}", upstream_ca=args.ca_cert,
                            upstream_cert=args.cert, upstream_key=args.key)
    flwr_home = Path(args.state_dir).resolve() / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{TUNNEL_CONNECTION}"\n\n[superlink.{TUNNEL_CONNECTION}]\n'
        f'address = "{local.address}"\ninsecure = true\n', encoding="utf-8")
    console.print(f"operator {name}: 127.0.0.1:{local.port} → {args.coordinator} (mutual TLS, Control API only); "
                  f"anyone on this machine can use this port while it runs. Ctrl-C to stop.")
    console.print(f"  FLWR_HOME={flwr_home} flwr supernode list {TUNNEL_CONNECTION}   (or flwr ls, flwr stop ...)")
    run(serve(servers))
    return 0
