"""The agent's app launcher: only the federation's signed app runs inside the organization.

Flower's SuperNode with `--isolation subprocess` starts `flower-superexec`,
which starts Flower's `flwr-clientapp` for each task; that process installs
whatever bundle (FAB) the SuperLink sent and imports its ClientApp, which reads
the node config (the silo's path) and may open any file the agent can. So the
agent (clients/supernode.py) starts its SuperNode with `--isolation process`
— the SuperNode then launches nothing itself — and runs this launcher beside it:

``serve`` (one process per SuperNode; what `flower-superexec` does, reduced to
ClientApp tasks, after flwr 1.41's `flwr.supercore.superexec.run_superexec`):
polls the SuperNode's Runtime API with `AcquireTask`, signed with the
SuperNode's SuperExec secret (`--superexec-auth-secret-file`: in process
isolation Flower checks it, so no other local process can claim the tasks),
and for each ClientApp task it gets starts one ``flwr-clientapp`` process of
ours, handing it the task's token on stdin (not on the command line).

``flwr-clientapp-runner`` (with ``serve --warm-runner``, which the agent uses
with its resident trainer): one long-lived process per verified app, keyed by
the full sha256 of the FAB; the launcher writes each task's token to the
runner's stdin. Without ``--warm-runner`` (the agent's ``--no-resident``, whose
ClientApp loads the model itself) each task gets a ``flwr-clientapp`` process
of its own. What a task or runner process does — verify the bundle before
anything of it is written or imported, install it under its full hash, load
and run the ClientApp — is clients/app_task.py.

Without a publisher key (`--unsigned-apps`: `silotune agent start --insecure`
or `--unsigned-apps`) every bundle runs, as with Flower's own launcher, and
each task logs a warning.

The module imports only the standard library and clients/app_task.py (itself
only the standard library) at start; Flower and runtime/ are imported where used.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from logging import DEBUG, INFO, WARNING
from pathlib import Path

from clients.app_task import run_runner, run_task, show_silotune_log

SERVE = "serve"
TASK = "flwr-clientapp"  # in the task processes' command line, as Flower's own (tests look for it)
RUNNER = "flwr-clientapp-runner"  # a warm runner: many tasks of one app
MAX_RUNNERS = 2  # warm runners per launcher (one per app in use: a new job with a changed app adds one)
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"  # the Runtime API call SuperExec auth protects


def command(mode: str, runtime_api_address: str, *, publisher_key: Path | str | None,
            parent_pid: int | None = None, secret_file: Path | str | None = None,
            app_sha256: str | None = None, warm_runner: bool = False,
            poll_interval: float | None = None) -> list[str]:
    """The command line of a launcher (`serve`), task (`flwr-clientapp`) or runner process."""
    # -P: the working directory is not put on sys.path (nothing there may shadow a module).
    cmd = [sys.executable, "-P", "-m", "clients.app_launcher", mode, "--runtime-api-address", runtime_api_address]
    cmd += ["--app-publisher-key", str(Path(publisher_key).resolve())] if publisher_key else ["--unsigned-apps"]
    if parent_pid is not None:
        cmd += ["--parent-pid", str(parent_pid)]
    if secret_file is not None:
        cmd += ["--superexec-auth-secret-file", str(Path(secret_file).resolve())]
    if app_sha256 is not None:
        cmd += ["--app-sha256", app_sha256]
    if warm_runner:
        cmd += ["--warm-runner"]
    if poll_interval is not None:
        cmd += ["--poll-interval", repr(float(poll_interval))]
    return cmd


# ------------------------------------------------------------------ the launcher
class Runners:
    """The launcher's warm runners, one per app (the FAB's sha256), at most `limit`."""

    def __init__(self, runtime_api_address: str, publisher_key: Path | None, limit: int = MAX_RUNNERS) -> None:
        self.address, self.publisher_key, self.limit = runtime_api_address, publisher_key, max(1, limit)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}  # by sha256, least recently used first
        self.retired: list[subprocess.Popen[bytes]] = []  # finishing their last tasks

    def hand(self, app_sha256: str, token: str, *, retry: bool = True) -> subprocess.Popen[bytes]:
        """Give the task to the app's runner (started if there is none alive); the runner."""
        if not _SHA256_HEX.match(app_sha256):
            raise ValueError(f"not a FAB sha256: {app_sha256!r:.80}")
        proc = self.procs.pop(app_sha256, None)
        if proc is not None and proc.poll() is not None:
            proc = None  # it left (a refused bundle, a crash; reaped by poll()): a fresh one
        if proc is None:
            while len(self.procs) >= self.limit:  # the least recently used app's runner goes
                self._retire(self.procs.pop(next(iter(self.procs))))
            proc = subprocess.Popen(  # pylint: disable=consider-using-with
                command(RUNNER, self.address, publisher_key=self.publisher_key, parent_pid=os.getpid(),
                        app_sha256=app_sha256), stdin=subprocess.PIPE)
        self.procs[app_sha256] = proc
        assert proc.stdin is not None
        try:
            proc.stdin.write(token.encode() + b"\n")
            proc.stdin.flush()
        except BrokenPipeError:  # it died between poll() and the write: one retry with a fresh runner
            self.procs.pop(app_sha256, None)
            if not retry:
                raise
            return self.hand(app_sha256, token, retry=False)
        return proc

    def _retire(self, proc: subprocess.Popen[bytes]) -> None:
        """End of input: the runner finishes the tasks it was handed, then leaves (reaped by `reap`)."""
        try:
            assert proc.stdin is not None
            proc.stdin.close()
        except BrokenPipeError:
            pass
        self.retired.append(proc)

    def reap(self) -> None:
        self.retired = [proc for proc in self.retired if proc.poll() is None]

    def close(self) -> None:
        for proc in self.procs.values():
            self._retire(proc)
        self.procs.clear()


def serve(runtime_api_address: str, *, publisher_key: Path | None, secret: bytes | None,
          parent_pid: int | None, poll_interval: float = 0.1, warm_runner: bool = False) -> None:
    """Acquire ClientApp tasks from the SuperNode and run each (a task process, or an app's
    warm runner), until stopped. `poll_interval`: AcquireTask is a local call to the SuperNode,
    cheap enough to ask ten times a second; a task is looked for again at once."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore import log
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    from runtime.app_signature import load_publisher_public_key, publisher_fingerprint

    if publisher_key is not None:
        fingerprint = publisher_fingerprint(load_publisher_public_key(publisher_key))  # a bad key fails here
        log(INFO, "app launcher: only apps signed by publisher key %s run here", fingerprint)
    else:
        log(WARNING, "app launcher: no publisher key (--unsigned-apps): any app the coordinator sends runs here")
    log(INFO, "app launcher: %s, task poll every %.2f s",
        "a warm runner per app" if warm_runner else "one process per task", poll_interval)
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)  # the SuperNode gone: SIGINT, we leave
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_TASK}))
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())
    runners = Runners(runtime_api_address, publisher_key) if warm_runner else None
    tasks: list[subprocess.Popen[bytes]] = []
    try:
        while True:
            tasks = [task for task in tasks if task.poll() is None]  # reap finished ones
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if not (res.HasField("task") and res.token):
                time.sleep(poll_interval)
                continue
            log(DEBUG, "app launcher: task %d of run %d", res.task.task_id, res.task.run_id)
            if runners is not None and _SHA256_HEX.match(res.task.fab_hash):
                runners.reap()
                runners.hand(res.task.fab_hash, res.token)
                continue
            task = subprocess.Popen(  # pylint: disable=consider-using-with
                command(TASK, runtime_api_address, publisher_key=publisher_key, parent_pid=os.getpid()),
                stdin=subprocess.PIPE)
            assert task.stdin is not None
            task.stdin.write(res.token.encode() + b"\n")
            task.stdin.close()
            tasks.append(task)
    finally:
        if runners is not None:
            runners.close()
        client.close()


# ------------------------------------------------------------------ entry point
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.app_launcher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=[SERVE, TASK, RUNNER])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT")
    trust = parser.add_mutually_exclusive_group(required=True)
    trust.add_argument("--app-publisher-key", type=Path, help="run only apps signed by this key (publisher.pub)")
    trust.add_argument("--unsigned-apps", action="store_true", help="run any app (no verification)")
    parser.add_argument("--parent-pid", type=int, help="leave when this process is gone")
    parser.add_argument("--superexec-auth-secret-file", type=Path,
                        help="serve: the SuperNode's SuperExec secret, to sign AcquireTask")
    parser.add_argument("--poll-interval", type=float, default=0.1,
                        help="serve: seconds between task polls (a local call to the SuperNode)")
    parser.add_argument("--warm-runner", action="store_true",
                        help="serve: one long-lived runner process per app instead of one process per task")
    parser.add_argument("--app-sha256", help=f"{RUNNER}: the sha256 of the only bundle this runner serves")
    args = parser.parse_args(argv)
    if not 0 < args.poll_interval <= 60:
        parser.error(f"--poll-interval must be in (0, 60] seconds, got {args.poll_interval}")
    if (args.mode == RUNNER) != (args.app_sha256 is not None):
        parser.error(f"--app-sha256 goes with {RUNNER}, and only with it")
    if args.app_sha256 is not None and not _SHA256_HEX.match(args.app_sha256):
        parser.error(f"--app-sha256 must be 64 lowercase hex digits, got {args.app_sha256!r:.80}")
    if args.mode == SERVE:
        secret = args.superexec_auth_secret_file.read_bytes() if args.superexec_auth_secret_file else None
        try:
            serve(args.runtime_api_address, publisher_key=args.app_publisher_key, secret=secret,
                  parent_pid=args.parent_pid, poll_interval=args.poll_interval, warm_runner=args.warm_runner)
        except KeyboardInterrupt:  # SIGINT, or the SuperNode gone (parent monitor)
            return 0
        return 0
    show_silotune_log()
    if args.mode == RUNNER:
        try:
            return run_runner(args.runtime_api_address, args.app_sha256, iter(sys.stdin.readline, ""),
                              publisher_key=args.app_publisher_key, parent_pid=args.parent_pid)
        except KeyboardInterrupt:  # the launcher gone (parent monitor)
            return 0
    token = sys.stdin.readline().strip()
    if not token:
        parser.error("the task's token is read from stdin; got none")
    run_task(args.runtime_api_address, token, publisher_key=args.app_publisher_key, parent_pid=args.parent_pid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
