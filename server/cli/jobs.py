"""`silotune job …` and `silotune specialist …`: an operator drives a coordinator service.

The service is `silotune coordinator --serve` (server/cli/coordinator.py); these commands
speak its jobs API (server/service/api.py) with an operator certificate (mutual TLS):

    silotune job submit --specialist NAME [--scenario FILE.yaml] [--set key=value ...] [--continue NAME[:V]]
    silotune job ls | watch JOB | cancel JOB
    silotune specialist ls [NAME] | show NAME[:V] | fetch NAME[:V] --out DIR

Where the service is and who you are: --api HOST:PORT, --ca-cert ca.pem, --cert
operator-NAME.pem, --key operator-NAME.key, or the environment variables SILOTUNE_API,
SILOTUNE_CA_CERT, SILOTUNE_OPERATOR_CERT, SILOTUNE_OPERATOR_KEY.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from rich.table import Table

from runtime.console import console
from server.cli.report_table import plain, report_table
from server.cli.round_table import render_event

RunConfigReader = Callable[[str | None, list[str]], dict[str, Any]]

CONNECTION = (("--api", "SILOTUNE_API", "the coordinator's jobs API, HOST:PORT (`coordinator --serve --api-port`)"),
              ("--ca-cert", "SILOTUNE_CA_CERT", "the federation's ca.pem"),
              ("--cert", "SILOTUNE_OPERATOR_CERT", "your operator certificate (operator-NAME.pem)"),
              ("--key", "SILOTUNE_OPERATOR_KEY", "its private key (operator-NAME.key)"))


def register(commands: argparse._SubParsersAction, read_run_config: RunConfigReader) -> None:
    job = commands.add_parser("job", help="submit, list, watch and cancel jobs of a coordinator service")
    verbs = job.add_subparsers(dest="verb", required=True)
    p = _with_connection(verbs.add_parser("submit", help="queue a job that trains (or continues) a specialist"))
    p.add_argument("--specialist", help="the name its result is registered under (default with --continue: "
                                        "that specialist's name)")
    p.add_argument("--scenario", help="take the run config from a scenario file (its run-config section)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a run-config key (pyproject.toml's [tool.flwr.app.config]); repeat")
    p.add_argument("--continue", dest="continue_from", metavar="NAME[:V]",
                   help="start from this registered specialist (latest version without :V); the result is "
                        "its next version")
    p.set_defaults(handler=job_submit, read_run_config=read_run_config)
    _with_connection(verbs.add_parser("ls", help="the service's jobs")).set_defaults(handler=job_ls)
    p = _with_connection(verbs.add_parser("watch", help="a job's rounds as they happen, until it ends"))
    p.add_argument("job")
    p.set_defaults(handler=job_watch)
    p = _with_connection(verbs.add_parser("cancel", help="drop a queued job or stop a running one"))
    p.add_argument("job")
    p.set_defaults(handler=job_cancel)

    specialist = commands.add_parser("specialist", help="the specialists a coordinator service has registered")
    verbs = specialist.add_subparsers(dest="verb", required=True)
    p = _with_connection(verbs.add_parser("ls", help="registered specialists and versions"))
    p.add_argument("name", nargs="?")
    p.set_defaults(handler=specialist_ls)
    p = _with_connection(verbs.add_parser("show", help="a specialist's scores and provenance"))
    p.add_argument("ref", metavar="NAME[:V]")
    p.set_defaults(handler=specialist_show)
    p = _with_connection(verbs.add_parser("fetch", help="download a specialist's adapter folder (sha256-checked)"))
    p.add_argument("ref", metavar="NAME[:V]")
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    p.set_defaults(handler=specialist_fetch)


def _with_connection(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for flag, env, text in CONNECTION:
        p.add_argument(flag, default=os.environ.get(env), help=f"{text} (default ${env})")
    return p


@contextmanager
def _jobs_api(args: argparse.Namespace) -> Iterator[Any]:
    """A stub of the jobs API; a refused or failed call becomes a RuntimeError naming the status."""
    import grpc

    from server.pki import verify_operator_cert
    from server.service.api import connect

    missing = [f"{flag} (or ${env})" for flag, env, _ in CONNECTION if not getattr(args, flag[2:].replace("-", "_"))]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    verify_operator_cert(args.ca_cert, args.cert, args.key)   # a clear error before the handshake's
    try:
        with connect(args.api, args.ca_cert, args.cert, args.key) as stub:
            yield stub
    except grpc.RpcError as err:
        raise RuntimeError(f"the jobs API at {args.api}: {err.code().name}: {err.details()}") from None


def _parse_ref(ref: str) -> tuple[str, int]:
    name, sep, version = ref.partition(":")
    if sep and not version.isdigit():
        raise ValueError(f"{ref!r}: expected NAME or NAME:VERSION")
    return name, int(version) if sep else 0


# ------------------------------------------------------------------ jobs
def job_submit(args: argparse.Namespace) -> int:
    from protos.silotune.v1 import jobs_pb2 as pb
    from server.service.api import encode_run_config

    if not args.specialist and not args.continue_from:
        raise ValueError("--specialist NAME is required (or --continue NAME[:V])")
    run_config = args.read_run_config(args.scenario, args.overrides)
    with _jobs_api(args) as jobs:
        job = jobs.Submit(pb.SubmitRequest(specialist=args.specialist or "", run_config=encode_run_config(run_config),
                                           continue_from=args.continue_from or ""))
    console.print(plain(f"{job.id} queued: specialist {job.specialist}"
                        + (f", continuing {job.continue_from}" if job.continue_from else "")))
    console.print(f"  follow it: silotune job watch {job.id}")
    return 0


def job_ls(args: argparse.Namespace) -> int:
    from protos.silotune.v1 import jobs_pb2 as pb

    with _jobs_api(args) as jobs:
        listed = jobs.List(pb.ListRequest()).jobs
    table = Table(title="jobs")
    for column in ("job", "specialist", "state", "run", "version", "created", "finished", "note"):
        table.add_column(column)
    for job in listed:
        table.add_row(job.id, plain(job.specialist), job.state, str(job.run_id or ""),
                      str(job.specialist_version or ""), job.created_at, job.finished_at,
                      plain(job.error or (f"continues {job.continue_from}" if job.continue_from else ""), 120))
    console.print(table)
    return 0


def job_watch(args: argparse.Namespace) -> int:
    """The job's round events as `silotune coordinator` prints them, then how it ended."""
    from protos.silotune.v1 import jobs_pb2 as pb

    with _jobs_api(args) as jobs:
        for message in jobs.Watch(pb.JobRef(id=args.job)):
            try:
                event = json.loads(message.json)
            except json.JSONDecodeError:
                continue
            for renderable in render_event(event):
                console.print(renderable)
        job = jobs.GetJob(pb.JobRef(id=args.job))
        specialist = (jobs.GetSpecialist(pb.SpecialistRef(name=job.specialist, version=job.specialist_version))
                      if job.specialist_version else None)
    if specialist is not None:
        console.print(report_table(_report(specialist)))
        console.print(plain(f"{job.id} finished: specialist {specialist.name}:{specialist.version}"))
        return 0
    console.print(plain(f"{job.id} {job.state}" + (f": {job.error}" if job.error else ""), 4000))
    return 1


def job_cancel(args: argparse.Namespace) -> int:
    from protos.silotune.v1 import jobs_pb2 as pb

    with _jobs_api(args) as jobs:
        job = jobs.Cancel(pb.JobRef(id=args.job))
    console.print(f"{job.id} {job.state}")
    return 0


# ------------------------------------------------------------------ specialists
def specialist_ls(args: argparse.Namespace) -> int:
    from protos.silotune.v1 import jobs_pb2 as pb

    with _jobs_api(args) as jobs:
        found = jobs.ListSpecialists(pb.ListSpecialistsRequest(name=args.name or "")).specialists
    table = Table(title="specialists")
    for column in ("specialist", "created", "job", "base model", "metric", "overall", "parent"):
        table.add_column(column)
    for s in found:
        overall = json.loads(s.metrics_json or "{}").get("overall", {}).get("specialist", {})
        score = _score(overall, s.metric)
        table.add_row(plain(f"{s.name}:{s.version}"), s.created_at, plain(s.job_id), plain(s.base_model),
                      plain(s.metric), score, plain(s.parent))
    console.print(table)
    return 0


def specialist_show(args: argparse.Namespace) -> int:
    from protos.silotune.v1 import jobs_pb2 as pb

    name, version = _parse_ref(args.ref)
    with _jobs_api(args) as jobs:
        s = jobs.GetSpecialist(pb.SpecialistRef(name=name, version=version))
    console.print(plain(f"{s.name}:{s.version} — job {s.job_id}, {s.rounds} round(s), base {s.base_model}, "
                        f"created {s.created_at}"))
    console.print(plain(f"  adapter sha256 {s.adapter_sha256}; task spec {s.task_spec_fingerprint or '—'}; "
                        f"secure aggregation {'on' if s.secure_aggregation else 'off'}; "
                        f"ε {s.epsilon if s.HasField('epsilon') else '— (no DP)'}"
                        + (f"; continued from {s.parent}" if s.parent else "")))
    console.print(report_table(_report(s)))
    return 0


def specialist_fetch(args: argparse.Namespace) -> int:
    """Write the specialist's files into a fresh folder next to --out, each checked against the
    sha256 the service sent, then rename it to --out: --out is either absent or complete."""
    from protos.silotune.v1 import jobs_pb2 as pb

    out = Path(args.out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; refusing to write into it")
    name, version = _parse_ref(args.ref)
    tmp = out.with_name(f".{out.name}.fetching")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written: dict[str, str] = {}
    try:
        with _jobs_api(args) as jobs:
            current, digest, handle = None, hashlib.sha256(), None
            for chunk in jobs.FetchSpecialist(pb.SpecialistRef(name=name, version=version)):
                if chunk.path != current:
                    if handle is not None:
                        raise RuntimeError(f"{current}: the service sent no sha256 for it")
                    current, digest = chunk.path, hashlib.sha256()
                    handle = open(_inside(tmp, chunk.path), "xb")
                handle.write(chunk.data)
                digest.update(chunk.data)
                if chunk.sha256:
                    handle.close()
                    handle = None
                    if digest.hexdigest() != chunk.sha256:
                        raise RuntimeError(f"{chunk.path}: sha256 {digest.hexdigest()} is not the "
                                           f"{chunk.sha256} the service sent")
                    written[chunk.path] = chunk.sha256
            if handle is not None:
                handle.close()
                raise RuntimeError(f"{current}: the transfer ended before its sha256")
        if not written:
            raise RuntimeError(f"{args.ref}: the service sent no files")
        if out.exists():
            out.rmdir()   # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    console.print(plain(f"{len(written)} file(s) of {args.ref} in {out}, sha256 checked"))
    return 0


def _inside(root: Path, relative: str) -> Path:
    """``root/relative`` for a path the service sent, refused if it would leave ``root``."""
    parts = PurePosixPath(relative).parts
    if not parts or relative.startswith("/") or any(part in ("..", "") for part in parts):
        raise RuntimeError(f"the service sent a file path outside the folder: {relative!r}")
    path = root.joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _report(s: Any) -> dict[str, Any]:
    """What report_table needs, from a registered specialist's metadata."""
    provenance = json.loads(s.provenance_json or "{}")
    return {"job_id": s.job_id, "rounds": s.rounds, "strategy": provenance.get("strategy", "?"),
            "metric": s.metric, "init_adapter": provenance.get("init_adapter"),
            **json.loads(s.metrics_json or '{"organizations": {}, "overall": {}}')}


def _score(metrics: dict[str, Any], metric: str) -> str:
    from server.cli.report_table import SCORES, format_metric

    key = SCORES.get(metric, (metric, ""))[0]
    value = metrics.get(key)
    return format_metric(value, "accuracy") if isinstance(value, (int, float)) else "—"
