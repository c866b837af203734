"""`silotune agent start` and `silotune agent check`: an organization's side.

start: validates the silo, starts (or joins, via RAY_ADDRESS) the
organization's Ray with the resident trainer that loads the base model once,
and runs the SuperNode until stopped — TLS and node authentication by default
(the federation's CA certificate and this organization's enrolled key).
`--ca-cert` (the federation's ca.pem) verifies the coordinator, `--private-key`
(ORG.key from `silotune pki org-key`) authenticates; a quick TLS handshake
checks the coordinator's certificate against the CA before the SuperNode
starts, so a wrong CA file is a named error here. `--insecure` opts out
(local experiments only) with a warning.
check: validates the silo file and prints a summary; nothing is sent anywhere.

The coordinator's side is `silotune coordinator` (server/cli/coordinator.py).
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
from pathlib import Path

from rich.table import Table

from runtime.console import INSECURE_WARNING, console

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
    p.add_argument("--data", required=True, help="this organization's silo file (.jsonl, .csv, .parquet)")
    p.add_argument("--ca-cert", help="the federation's CA certificate (ca.pem) to verify the coordinator")
    p.add_argument("--private-key", help="this organization's node key (ORG.key from `silotune pki org-key`)")
    p.add_argument("--insecure", action="store_true",
                   help="opt out of TLS and node authentication (local experiments only)")
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
    p.add_argument("--no-resident", action="store_true",
                   help="no Ray: every round's ClientApp process loads the base model itself")
    p.add_argument("--max-wait-time", type=float,
                   help="give up if the coordinator cannot be reached for this many seconds (default: retry)")
    p.set_defaults(handler=start)

    p = actions.add_parser("check", help="validate and summarize a silo file; nothing is sent")
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="smollm2-135m", help="tokenizer for the length statistics")
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=check)


def start(args: argparse.Namespace) -> int:
    from clients.agent import Agent

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
    split_address(args.coordinator)
    if args.insecure:
        console.print(INSECURE_WARNING)
    else:
        verified = check_coordinator_tls(args.coordinator, ca_cert)
        console.print(f"node key {fingerprint} (the coordinator must have enrolled it); coordinator "
                      + ("certificate verified" if verified else "not reachable yet, the SuperNode will retry"))
    agent = Agent(args.data, args.coordinator, name=args.name, state_dir=args.state_dir,
                  resident=not args.no_resident, gpus=args.gpus, train_workers=args.train_workers,
                  rank=args.rank,
                  supernode_options={**security, "max_wait_time": args.max_wait_time})
    agent.start()
    assert agent.silo is not None and agent.supernode is not None
    console.print(f"organization {agent.name}: {len(agent.silo)} {agent.silo.task} examples in {agent.data} "
                  "(they stay here)")
    console.print(f"SuperNode pid {agent.supernode.pid} → {args.coordinator}"
                  + (", resident trainer on Ray" if agent.resident else ", no resident trainer")
                  + (f", {agent.plan.train_workers} train workers" if agent.plan.distributed else "")
                  + "; Ctrl-C to leave the federation")
    return agent.serve()


def check(args: argparse.Namespace) -> int:
    from clients.silo_check import check_silo

    summary = check_silo(args.data, model=args.model, max_length=args.max_length)
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
        return 0
    table = Table(title=f"{Path(args.data).name}: {summary.task} silo — nothing leaves this machine")
    table.add_column("")
    table.add_column("", justify="right")
    table.add_row("rows", str(summary.rows))
    table.add_row("train / test split", f"{summary.train} / {summary.test}")
    for label, count in summary.labels.items():
        table.add_row(f"label {label!r}", f"{count} ({count / summary.rows:.0%})")
    tokens = summary.tokens
    table.add_row("tokens (min / p50 / p95 / max)",
                  f"{tokens['min']:.0f} / {tokens['p50']:.0f} / {tokens['p95']:.0f} / {tokens['max']:.0f}")
    table.add_row(f"longer than max-length {summary.max_length}", f"{summary.truncated} (truncated in training)")
    console.print(table)
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
