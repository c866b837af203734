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

``flwr-clientapp`` (one process per task; a copy of flwr 1.41's
`flwr.supernode.runtime.run_clientapp.run_clientapp` with one step added and
the runtime dependency installation left out): pulls the task input (message,
context, run, FAB) and, before anything of the bundle is written or imported,
checks the FAB against the federation's publisher key
(runtime/app_signature.py: every file signed, none modified, none extra, a
valid Ed25519 signature). A refused bundle gets an error reply
(`ErrorCode.INVALID_FAB`, reason `app refused: unsigned app` / `app signature
invalid ...` / `file X modified` ...); it is never installed and its ClientApp
is never imported, so its code never runs and never sees the silo. An accepted
one is installed into a folder named after its full sha256
(`$FLWR_HOME/silotune-apps/<sha256>/`) and its ClientApp loaded from exactly
that folder (Flower's own install path is keyed by 8 hex digits of the hash
and by names the SuperLink states).

Without a publisher key (`--unsigned-apps`: `silotune agent start --insecure`
or `--unsigned-apps`) every bundle runs, as with Flower's own launcher, and
each task logs a warning.

The module imports only the standard library, Flower and runtime/ at start; a
task process drops the app's own top-level packages (clients, runtime, ...)
from `sys.modules` before it loads the ClientApp, so the bundle's verified
copies are what runs, never a mix with the agent's installed silotune.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from logging import DEBUG, ERROR, INFO, WARNING
from pathlib import Path

SERVE = "serve"
TASK = "flwr-clientapp"  # in the task processes' command line, as Flower's own (tests look for it)
ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"  # the Runtime API call SuperExec auth protects
INSTALL_DIR = "silotune-apps"  # under $FLWR_HOME


def command(mode: str, runtime_api_address: str, *, publisher_key: Path | str | None,
            parent_pid: int | None = None, secret_file: Path | str | None = None) -> list[str]:
    """The command line of a launcher (`serve`) or task (`flwr-clientapp`) process."""
    # -P: the working directory is not put on sys.path (nothing there may shadow a module).
    cmd = [sys.executable, "-P", "-m", "clients.app_launcher", mode, "--runtime-api-address", runtime_api_address]
    cmd += ["--app-publisher-key", str(Path(publisher_key).resolve())] if publisher_key else ["--unsigned-apps"]
    if parent_pid is not None:
        cmd += ["--parent-pid", str(parent_pid)]
    if secret_file is not None:
        cmd += ["--superexec-auth-secret-file", str(Path(secret_file).resolve())]
    return cmd


# ------------------------------------------------------------------ the launcher
def serve(runtime_api_address: str, *, publisher_key: Path | None, secret: bytes | None,
          parent_pid: int | None, poll_interval: float = 1.0) -> None:
    """Acquire ClientApp tasks from the SuperNode and start a task process for each, until stopped."""
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
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)  # the SuperNode gone: SIGINT, we leave
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_TASK}))
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())
    tasks: list[subprocess.Popen[bytes]] = []
    try:
        while True:
            tasks = [task for task in tasks if task.poll() is None]  # reap finished ones
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if res.HasField("task") and res.token:
                log(DEBUG, "app launcher: task %d of run %d", res.task.task_id, res.task.run_id)
                task = subprocess.Popen(  # pylint: disable=consider-using-with
                    command(TASK, runtime_api_address, publisher_key=publisher_key, parent_pid=os.getpid()),
                    stdin=subprocess.PIPE)
                assert task.stdin is not None
                task.stdin.write(res.token.encode() + b"\n")
                task.stdin.close()
                tasks.append(task)
            time.sleep(poll_interval)
    finally:
        client.close()


# ------------------------------------------------------------------ one task
def app_packages(fab: bytes) -> set[str]:
    """Top-level module names of a bundle's Python files (`clients/app.py` -> clients, `x.py` -> x)."""
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        names = archive.namelist()
    return {name.split("/", 1)[0] if "/" in name else name[:-3] for name in names if name.endswith(".py")}


def forget_modules(packages: set[str]) -> list[str]:
    """Drop `packages` and their submodules from sys.modules, so the next import reads the app's files."""
    import importlib

    gone = [name for name in list(sys.modules) if name.split(".", 1)[0] in packages]
    for name in gone:
        del sys.modules[name]
    importlib.invalidate_caches()
    return gone


def check_loaded_from(app_dir: Path, packages: set[str]) -> int:
    """The number of the app's modules imported; RuntimeError if one was imported from outside `app_dir`."""
    root = Path(app_dir).resolve()
    loaded = [(name, module) for name, module in list(sys.modules.items())
              if name.split(".", 1)[0] in packages and getattr(module, "__file__", None)]
    strays = [name for name, module in loaded if not Path(module.__file__).resolve().is_relative_to(root)]
    if strays:
        raise RuntimeError(f"modules of the app imported from outside {root}: {', '.join(sorted(strays)[:5])}")
    return len(loaded)


def run_task(runtime_api_address: str, token: str, *, publisher_key: Path | None,
             parent_pid: int | None) -> None:
    """One ClientApp task: pull its input, verify the app, then install, load and run it.

    A copy of flwr 1.41.0 `flwr.supernode.runtime.run_clientapp.run_clientapp`
    (pinned with flwr==1.41.0): the same Runtime API calls, heartbeat, error
    replies and exit handling, reusing its `pull_task_input`, `push_message`
    and `push_task_output`; added: `verify_fab` before installation, the
    install folder keyed by the full hash, loading from that folder; left out:
    runtime dependency installation (silotune never allows it).
    """
    import hashlib

    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.client_app import ClientApp, LoadClientAppError
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore import log
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.exit import ExitCode, flwr_exit, register_signal_handlers
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
    from flwr.supercore.telemetry import EventType
    from flwr.supercore.utils import get_flwr_home
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    from runtime.app_signature import AppRejected, load_publisher_public_key, publisher_fingerprint, verify_fab

    key = load_publisher_public_key(publisher_key) if publisher_key is not None else None
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)

    retry_invoker = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeTracingInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry_invoker)

    heartbeat_sender = None
    message = None
    reply_message = None
    context = None
    outcome = {"sub_status": SubStatus.FAILED, "details": "ClientApp task failed due to unknown reason"}
    exit_code = ExitCode.SUCCESS

    def on_exit() -> None:
        retry_invoker.max_tries = 1  # do not block on exit
        push_task_output(client=client, context=context, sub_status=outcome["sub_status"],
                         details=outcome["details"])
        if heartbeat_sender is not None and heartbeat_sender.is_running:
            heartbeat_sender.stop()
        client.close()

    register_signal_handlers(event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE, exit_message="Task stopped.",
                             exit_handlers=[on_exit])
    try:
        heartbeat_sender = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat_sender.start()

        message, context, run, fab = pull_task_input(client)

        # Added: nothing of the bundle is written or imported before this check.
        if key is not None:
            signature = verify_fab(fab.content, key)
            log(INFO, "app %s verified: %d files signed by publisher key %s", run.fab_id,
                len(signature.files), publisher_fingerprint(key))
        else:
            log(WARNING, "app %s runs unverified (--unsigned-apps)", run.fab_id)

        digest = hashlib.sha256(fab.content).hexdigest()
        app_dir = install_from_fab(fab.content, install_dir=get_flwr_home() / INSTALL_DIR / digest,
                                   skip_prompt=True)
        packages = app_packages(fab.content)
        dropped = forget_modules(packages)
        log(DEBUG, "loading the ClientApp from %s (dropped %d preloaded modules)", app_dir, len(dropped))
        load_client_app_fn = get_load_client_app_fn(default_app_ref="", app_path=str(app_dir), multi_app=True)
        client_app: ClientApp = load_client_app_fn(run.fab_id, run.fab_version, fab.hash_str)
        log(INFO, "ClientApp loaded from %s (%d modules of the app)", app_dir, check_loaded_from(app_dir, packages))

        reply_message = client_app(message=message, context=context)
        outcome.update(sub_status=SubStatus.COMPLETED, details="")

    except AppRejected as err:
        reason = f"app refused: {err}"
        log(ERROR, "%s; the app was not installed and its ClientApp not loaded", reason)
        outcome["details"] = reason
        if message:
            reply_message = Message(Error(code=ErrorCode.INVALID_FAB, reason=reason), reply_to=message)
        exit_code = ExitCode.TASK_PROC_EXCEPTION
    except Exception as ex:  # pylint: disable=broad-exception-caught
        # As upstream: any other failure becomes an error reply with the exception.
        e_code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        reason = str(type(ex)) + ":<'" + str(ex) + "'>"
        if isinstance(ex, LoadClientAppError):
            reason = "An exception was raised when attempting to load `ClientApp`"
            e_code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
        log(ERROR, "ClientApp raised an exception", exc_info=ex)
        outcome["details"] = reason
        if message:
            reply_message = Message(Error(code=e_code, reason=reason), reply_to=message)
        exit_code = ExitCode.COMMON_APP_IMPORT_ERROR if isinstance(ex, ImportError) else ExitCode.TASK_PROC_EXCEPTION
    finally:
        if reply_message and context:
            try:
                push_message(client, reply_message, context)
            except Exception as ex:  # pylint: disable=broad-exception-caught
                log(ERROR, "Failed to push reply message", exc_info=ex)
                exit_code = ExitCode.CLIENTAPP_COMMUNICATION_ERROR

    flwr_exit(code=exit_code, event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE)


# ------------------------------------------------------------------ entry point
def _show_silotune_log() -> None:
    """A task's silotune lines (the silo it loaded, the prompt format it renders, its loss) go to
    the agent's log like the SuperNode's own: nobody configures logging in this process."""
    import logging

    logger = logging.getLogger("silotune")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(INFO)
        logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.app_launcher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=[SERVE, TASK])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT")
    trust = parser.add_mutually_exclusive_group(required=True)
    trust.add_argument("--app-publisher-key", type=Path, help="run only apps signed by this key (publisher.pub)")
    trust.add_argument("--unsigned-apps", action="store_true", help="run any app (no verification)")
    parser.add_argument("--parent-pid", type=int, help="leave when this process is gone")
    parser.add_argument("--superexec-auth-secret-file", type=Path,
                        help="serve: the SuperNode's SuperExec secret, to sign AcquireTask")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="serve: seconds between task polls")
    args = parser.parse_args(argv)
    if args.mode == SERVE:
        secret = args.superexec_auth_secret_file.read_bytes() if args.superexec_auth_secret_file else None
        try:
            serve(args.runtime_api_address, publisher_key=args.app_publisher_key, secret=secret,
                  parent_pid=args.parent_pid, poll_interval=args.poll_interval)
        except KeyboardInterrupt:  # SIGINT, or the SuperNode gone (parent monitor)
            return 0
        return 0
    token = sys.stdin.readline().strip()
    if not token:
        parser.error("the task's token is read from stdin; got none")
    _show_silotune_log()
    run_task(args.runtime_api_address, token, publisher_key=args.app_publisher_key, parent_pid=args.parent_pid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
