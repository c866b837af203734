"""`silotune agent start` and `silotune agent check`: an organization's side.

start: validates the silo, starts (or joins, via RAY_ADDRESS) the
organization's Ray with the resident trainer that loads the base model once,
and runs the SuperNode until stopped — TLS and node authentication by default
(the federation's CA certificate and this organization's enrolled key).
`--ca-cert` (the federation's ca.pem) verifies the coordinator, `--private-key`
(ORG.key from `silotune pki org-key`) authenticates; a quick TLS handshake
checks the coordinator's certificate against the CA before the SuperNode
starts, so a wrong CA file is a named error here. `--insecure` opts out
(local experiments only) with a warning. `--policy FILE` is the
organization's policy (clients/policy.py), validated before anything starts
and enforced on every instruction; without it, the default policy.
check: validates the silo file and prints a summary (`--data`), and/or prints
every rule of the policy the agent would enforce (`--policy`); nothing is sent
anywhere.

The coordinator's side is `silotune coordinator` (server/cli/coordinator.py).
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from runtime.console import INSECURE_WARNING, console

if TYPE_CHECKING:
    from clients.policy import OrganizationPolicy
    from clients.silo_check import SiloSummary

AGENT_NEEDS_KEYS = (
    "TLS and node authentication are on by default: pass --ca-cert (the federation's ca.pem) and "
    "--private-key (this organization's key, from `silotune pki org-key`), or --insecure to opt "
    "out (local experiments only)"
)


def register(commands: argparse._SubParsersAction) -> None:
    agent = commands.add_parser("agent", help="an organization's agent: start it, or check a silo file first")
    actions = agent.add_subparsers(dest="action", required=True)

    p = actions.add_parser("start", help="join a federation: Ray + resident trainer + SuperNode")
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator's SuperLink")
    p.add_argument("--data", required=True, action="append", metavar="[NAME=]FILE",
                   help="a silo file this agent offers (.jsonl, .json, .csv, .parquet, .arrow, or a Hugging Face "
                        "datasets folder; README, \"Bring your own data\"), named NAME ([A-Za-z0-9._-]+) or by the "
                        "file's stem. Repeatable: each job names the one it trains on (its `dataset`; empty: the "
                        "agent's only one); every file is validated at start")
    p.add_argument("--ca-cert", help="the federation's CA certificate (ca.pem) to verify the coordinator")
    p.add_argument("--private-key", help="this organization's node key (ORG.key from `silotune pki org-key`)")
    p.add_argument("--insecure", action="store_true",
                   help="opt out of TLS and node authentication (local experiments only)")
    p.add_argument("--app-publisher-key", metavar="PUB",
                   help="run only apps signed with this key (the federation's publisher.pub, `silotune pki "
                        "app-key`); a modified or unsigned app gets an error reply and never runs. Required "
                        "unless --insecure or --unsigned-apps")
    p.add_argument("--unsigned-apps", action="store_true",
                   help="opt out of the app signature check: any app the coordinator sends runs here")
    p.add_argument("--name", help="organization name shown in the coordinator's report")
    p.add_argument("--state-dir", help="logs and Flower state (default: runs/agent-<name>)")
    p.add_argument("--gpus", type=float, default=0.0,
                   help="GPUs of this organization's Ray: the resident trainer's, or with --train-workers N > 1 "
                        "one per worker (needs --gpus >= N; the resident trainer then holds none)")
    p.add_argument("--train-workers", type=int, default=1, metavar="N",
                   help="train each round on N Ray Train workers with DDP (one GPU each with --gpus, else one CPU "
                        "each; Ray needs N+1 CPUs with the resident trainer's). Each round starts the workers "
                        "afresh and they load the base model again, so N > 1 pays off for large models and long "
                        "rounds only. Default 1: the resident trainer trains in-process")
    p.add_argument("--rank", type=int, help="LoRA rank this organization trains (heterogeneous-rank jobs)")
    p.add_argument("--policy", metavar="FILE",
                   help="this organization's policy (YAML): what the agent accepts from the coordinator — base "
                        "models, job ids, floors on batch size, local steps and evaluation examples, secure "
                        "aggregation, local DP and its own ε caps, metrics (README, 'Organization policy'); "
                        "default: the built-in defaults (`silotune agent check --policy` shows them)")
    p.add_argument("--trusted-peers", metavar="FILE",
                   help="secure aggregation: the peer organizations' public keys (their ORG.pub lines) or SHA256: "
                        "fingerprints, from them, not from the coordinator; every session must then be signed by "
                        "them (default: peers' keys are not checked, the session floor is the only defence)")
    p.add_argument("--no-resident", action="store_true",
                   help="no Ray: every round's ClientApp process loads the base model itself")
    p.add_argument("--max-wait-time", type=float,
                   help="give up if the coordinator cannot be reached for this many seconds (default: retry)")
    p.add_argument("--pull-interval", type=float, metavar="SECONDS",
                   help="seconds between the SuperNode's requests for messages while idle (default 0.5, "
                        "clients/supernode.py; lower answers sooner and asks the coordinator more often)")
    p.add_argument("--flower-pacing", action="store_true",
                   help="run Flower's SuperNode unchanged: a 3 s wait after an empty pull, 0.5 s reply checks")
    p.set_defaults(handler=start)

    p = actions.add_parser("check", help="validate and summarize a silo file, and/or show the policy the agent "
                           "would enforce; nothing is sent")
    p.add_argument("--data", help="a silo file to validate and summarize")
    p.add_argument("--policy", metavar="FILE", help="a policy file: print every rule the agent would enforce")
    p.add_argument("--job", metavar="JOB.yaml",
                   help="the job's file (a scenario file or a mapping of run-config keys): show how --data maps "
                        "onto its task — its label set, rows it does not know, the exact prompt; its model and "
                        "max-length are used unless given here")
    p.add_argument("--model", help="tokenizer for the length statistics (default: the job's, else smollm2-135m)")
    p.add_argument("--max-length", type=int, help="default: the job's, else 160")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=check)


def pacing(args: argparse.Namespace) -> dict[str, object]:
    """The SuperNode's pacing options: Flower's own waits, or ours (the default interval unless given)."""
    if args.flower_pacing:
        if args.pull_interval is not None:
            raise ValueError("--flower-pacing keeps Flower's 3 s pull interval: drop --pull-interval")
        return {"pull_interval": None}
    if args.pull_interval is None:
        return {}
    from clients.supernode import check_interval

    return {"pull_interval": check_interval("--pull-interval", args.pull_interval)}  # before anything starts


def start(args: argparse.Namespace) -> int:
    from clients.agent import Agent
    from clients.policy import load_policy

    if args.policy:
        load_policy(args.policy)  # a bad policy stops here, before any key, connection or process
    if args.insecure:
        if args.ca_cert or args.private_key:
            raise ValueError("--insecure turns TLS and node authentication off: drop --ca-cert/--private-key")
        security: dict[str, object] = {"insecure": True}
    else:
        if not args.ca_cert or not args.private_key:
            raise ValueError(AGENT_NEEDS_KEYS)
        from runtime.keys import agent_files

        ca_cert, private_key, fingerprint = agent_files(args.ca_cert, args.private_key)
        security = {"insecure": False, "root_certificates": ca_cert, "auth_private_key": private_key}
    security["app_publisher_key"] = app_publisher_key(args)  # only the federation's signed app runs
    split_address(args.coordinator)
    if args.insecure:
        console.print(INSECURE_WARNING)
    else:
        verified = check_coordinator_tls(args.coordinator, ca_cert)
        console.print(f"node key {fingerprint} (the coordinator must have enrolled it); coordinator "
                      + ("certificate verified" if verified else "not reachable yet, the SuperNode will retry"))
    agent = Agent(args.data, args.coordinator, name=args.name, state_dir=args.state_dir,
                  resident=not args.no_resident, gpus=args.gpus, train_workers=args.train_workers,
                  rank=args.rank, policy=args.policy, trusted_peers=args.trusted_peers,
                  supernode_options={**security, "max_wait_time": args.max_wait_time,
                                     **pacing(args)})
    agent.start()
    assert agent.silos and agent.supernode is not None
    for dataset, silo in agent.silos.items():
        console.print(f"organization {agent.name}, dataset {dataset}: {len(silo)} {silo.task} examples in "
                      f"{agent.datasets[dataset]} (they stay here)")
    console.print(f"SuperNode pid {agent.supernode.pid} → {args.coordinator}"
                  + (", resident trainer on Ray" if agent.resident else ", no resident trainer")
                  + (f", {agent.plan.train_workers} train workers" if agent.plan.distributed else "")
                  + "; Ctrl-C to leave the federation")
    console.print(f"policy: {agent.policy_path or 'the defaults'} "
                  "(`silotune agent check --policy FILE` lists every rule)")
    return agent.serve()


def check(args: argparse.Namespace) -> int:
    if not args.data and not args.policy:
        raise ValueError("agent check: give --data (a silo file), --policy (a policy file), or both")
    if args.job and not args.data:
        raise ValueError("agent check: --job shows how a silo file maps onto the job's task: give --data too")
    _job_defaults(args)
    policy = None
    if args.policy:
        from clients.policy import load_policy

        policy = load_policy(args.policy)  # a bad file: PolicyError naming the key (exit 2)
    if args.json:
        out: dict = {}
        if args.data:
            from clients.silo_check import check_silo

            out = _summary(args).as_dict()
        if policy is not None:
            out = {**({"silo": out} if args.data else {}), "policy": policy.as_dict()}
        print(json.dumps(out, indent=2))
        return 1 if (out.get("silo", out) or {}).get("refused") else 0
    if policy is not None:
        print_policy(policy, args.policy)
    if args.data:
        return print_silo_summary(args)
    return 0


def _job_defaults(args: argparse.Namespace) -> None:
    """The job file's task spec, model and max-length; --model/--max-length still win."""
    args.spec = None
    if args.job:
        from clients.silo_check import job_from_file
        from protos.task_spec import TaskSpec

        job = job_from_file(args.job)
        args.spec = TaskSpec.from_config(job)
        args.model = args.model or job.model
        args.max_length = args.max_length or job.max_length
        args.test_fraction, args.seed = job.test_fraction, job.seed
    args.model = args.model or "smollm2-135m"
    args.max_length = args.max_length or 160


def _summary(args: argparse.Namespace) -> "SiloSummary":
    from clients.silo_check import check_silo

    extra = {"test_fraction": args.test_fraction, "seed": args.seed} if args.spec is not None else {}
    return check_silo(args.data, model=args.model, max_length=args.max_length, spec=args.spec, **extra)


def print_policy(policy: "OrganizationPolicy", path: str) -> None:
    """Every rule, its value in this policy, and what it means."""
    table = Table(title=f"{path}: what this agent accepts from a coordinator")
    table.add_column("rule", no_wrap=True)
    table.add_column("value", max_width=28)
    table.add_column("meaning", ratio=1)
    for name, value, meaning in policy.rows():
        table.add_row(name, value, meaning)
    console.print(table)


def print_silo_summary(args: argparse.Namespace) -> int:
    """The summary table; under a job, how the file maps onto its task. 1 when the job would be refused."""
    summary = _summary(args)
    table = Table(title=f"{Path(args.data).name}: {summary.task} silo — nothing leaves this machine")
    table.add_column("")
    table.add_column("", justify="right")
    table.add_row("rows", str(summary.rows))
    table.add_row("train / test split", f"{summary.train} / {summary.test}")
    for label, count in summary.labels.items():
        table.add_row(f"label {label!r}", f"{count} ({count / summary.rows:.0%})")
    for label, count in summary.labels_not_in_job.items():
        table.add_row(f"label {label!r} (not in the job)", f"{count} rows: {args.spec.unknown_labels}")
    for label in summary.labels_not_in_file:
        table.add_row(f"label {label!r} (the job's)", "0 rows here")
    tokens = summary.tokens
    table.add_row("tokens (min / p50 / p95 / max)",
                  f"{tokens['min']:.0f} / {tokens['p50']:.0f} / {tokens['p95']:.0f} / {tokens['max']:.0f}")
    table.add_row(f"longer than max-length {summary.max_length}",
                  f"{summary.truncated} (the middle of the prompt is left out)")
    console.print(table)
    if args.spec is None:
        return 0
    from clients.formatting import prompt_format
    from runtime.base_model import load_tokenizer

    console.print(f"job {args.job}: task {args.spec.kind}"
                  + (f", labels {', '.join(args.spec.labels)}" if args.spec.labels else "")
                  + f", metric {args.spec.headline_metric(summary.task)}, task fingerprint "
                  f"{summary.task_fingerprint[:16]}")
    console.print("every organization renders each row as (the row's fields in <>):")
    console.print(Text(prompt_format(args.spec, summary.task, summary.job_labels, load_tokenizer(args.model))),
                  style="dim")
    if summary.refused:
        console.print(Text(f"✗ {summary.refused}", style="red"))
        return 1
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
    from runtime.keys import PkiError, PkiHostMismatch, PkiWrongCA

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


AGENT_NEEDS_PUBLISHER_KEY = (
    "only the federation's signed app runs by default: pass --app-publisher-key (the federation's publisher.pub, "
    "from `silotune pki app-key`), or --unsigned-apps to run any app the coordinator sends"
)
UNSIGNED_APPS_WARNING = ("[yellow]warning: no --app-publisher-key: any app the coordinator sends runs here, with "
                         "access to the silo file[/yellow]")


def app_publisher_key(args: argparse.Namespace) -> Path | None:
    """The publisher key apps must be signed with (clients/app_launcher.py checks each one), or None.

    None (any app runs, with a warning) only with --unsigned-apps or --insecure.
    """
    if args.app_publisher_key:
        if args.unsigned_apps:
            raise ValueError("--unsigned-apps turns the app signature check off: drop --app-publisher-key")
        from runtime.app_signature import load_publisher_public_key, publisher_fingerprint

        fingerprint = publisher_fingerprint(load_publisher_public_key(args.app_publisher_key))
        console.print(f"only apps signed by publisher key {fingerprint} run here")
        return Path(args.app_publisher_key).resolve()
    if not (args.insecure or args.unsigned_apps):
        raise ValueError(AGENT_NEEDS_PUBLISHER_KEY)
    console.print(UNSIGNED_APPS_WARNING)
    return None
