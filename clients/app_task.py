"""A ClientApp task, run in a process of the agent's app launcher (clients/app_launcher.py):
only the federation's signed app runs inside the organization.

``flwr-clientapp-runner`` (the launcher's ``serve --warm-runner``, which the agent uses
with its resident trainer): one long-lived process per verified app, keyed by
the full sha256 of the FAB (the `fab_hash` AcquireTask reports; the runner
checks it against the bytes it pulls). The launcher writes each task's token
to the runner's stdin; the runner handles the tasks one after the other
exactly as a task process does (below), but flwr, torch, the verified
ClientApp and its Ray connection are imported and opened once, not per
message (a new process per message spends seconds on interpreter start,
imports and `ray.init`; benchmarks/deployment.py measures it).
Every task's bundle is still checked before anything of it is used; a
successful verification is remembered by the sha256 of the bundle's bytes,
so an identical bundle is not checked twice. A runner refuses a task whose
bundle is not the one it serves (another hash gets another runner); a runner
whose bundle was refused leaves at once, having installed and imported
nothing. Without ``--warm-runner`` (the agent's ``--no-resident``, whose
ClientApp loads the model itself) each task gets its own process as below.

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

The module imports only the standard library at start, Flower and runtime/
where used; a task process (or a runner, before its first task) drops the
app's own top-level packages (clients, runtime, ...) from `sys.modules` before
it loads the ClientApp, so the bundle's verified copies are what runs, never a
mix with the agent's installed silotune; a runner re-checks that before every
task. The verification code is bound before any app is loaded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from logging import DEBUG, ERROR, INFO, WARNING
from pathlib import Path

INSTALL_DIR = "silotune-apps"  # under $FLWR_HOME
#: retry for message objects the SuperNode is still storing (runtime/flower_backoff.py): a local store
OBJECT_BACKOFF, OBJECT_BACKOFF_CAP = 0.02, 0.2


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


class WrongApp(RuntimeError):
    """A task whose bundle is not the one this runner serves (never expected: the launcher routes by hash)."""


class TaskExecutor:
    """Runs ClientApp tasks in this process: one (a task process) or, in a runner, many of one app.

    The body of `execute` is a copy of flwr 1.41.0
    `flwr.supernode.runtime.run_clientapp.run_clientapp` (pinned with
    flwr==1.41.0): the same Runtime API calls, heartbeat, error replies and
    task output, reusing its `pull_task_input`, `push_message` and
    `push_task_output`; added: `verify_fab` before installation, the install
    folder keyed by the full hash, loading from that folder, and (a runner)
    keeping the loaded ClientApp for the next task of the same bundle; left
    out: runtime dependency installation (silotune never allows it).
    """

    def __init__(self, runtime_api_address: str, publisher_key: Path | None, only_sha256: str | None = None) -> None:
        # Bound now, before any app is loaded: a loaded app's own `runtime` package never does the checking.
        from flwr.supernode.runtime import run_clientapp

        from runtime.app_signature import AppRejected, load_publisher_public_key, publisher_fingerprint, verify_fab
        from runtime.flower_backoff import shorten_object_backoff

        # the task's message may be pulled before the SuperNode has stored its objects (runtime/flower_backoff.py)
        shorten_object_backoff(run_clientapp, "pull_and_inflate_object_from_tree", OBJECT_BACKOFF, OBJECT_BACKOFF_CAP)
        self.AppRejected, self.verify_fab, self.fingerprint = AppRejected, verify_fab, publisher_fingerprint
        self.address = runtime_api_address
        self.key = load_publisher_public_key(publisher_key) if publisher_key is not None else None
        self.only_sha256 = only_sha256
        self.verified: set[str] = set()  # sha256 of bundles whose signature checked out in this process
        self.loaded: tuple[str, Path, set[str], object] | None = None  # sha256, folder, packages, ClientApp
        self.refused = False  # the last task's bundle was refused
        self.finish_current: Callable[[], None] | None = None  # the running task's end (signal handlers call it)

    def on_exit(self) -> None:
        if self.finish_current is not None:
            self.finish_current()

    def execute(self, token: str) -> int:
        """One task: pull its input, verify the app, load it (or reuse it), run it, push the reply.
        Returns Flower's exit code for the task."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore import log
        from flwr.supercore.exit import ExitCode
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        retry_invoker = make_simple_http_retry_invoker()
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeTracingInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=retry_invoker)
        heartbeat_sender = None
        message = None
        reply_message = None
        context = None
        outcome = {"sub_status": SubStatus.FAILED, "details": "ClientApp task failed due to unknown reason"}
        exit_code = ExitCode.SUCCESS
        self.refused = False

        def finish() -> None:
            self.finish_current = None
            retry_invoker.max_tries = 1  # do not block on exit
            push_task_output(client=client, context=context, sub_status=outcome["sub_status"],
                             details=outcome["details"])
            if heartbeat_sender is not None and heartbeat_sender.is_running:
                heartbeat_sender.stop()
            client.close()

        self.finish_current = finish
        try:
            heartbeat_sender = HeartbeatSender(make_task_heartbeat_fn_http(client))
            heartbeat_sender.start()
            message, context, run, fab = pull_task_input(client)
            client_app = self._app(fab.content, run, log)
            reply_message = client_app(message=message, context=context)
            outcome.update(sub_status=SubStatus.COMPLETED, details="")
        except self.AppRejected as err:
            reason = f"app refused: {err}"
            log(ERROR, "%s; the app was not installed and its ClientApp not loaded", reason)
            outcome["details"] = reason
            self.refused = True
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
            exit_code = (ExitCode.COMMON_APP_IMPORT_ERROR if isinstance(ex, ImportError)
                         else ExitCode.TASK_PROC_EXCEPTION)
        finally:
            if reply_message and context:
                try:
                    push_message(client, reply_message, context)
                except Exception as ex:  # pylint: disable=broad-exception-caught
                    log(ERROR, "Failed to push reply message", exc_info=ex)
                    exit_code = ExitCode.CLIENTAPP_COMMUNICATION_ERROR
            if self.finish_current is finish:
                finish()
        return exit_code

    def _app(self, fab: bytes, run: object, log: Callable[..., None]) -> Callable[..., object]:
        """The task's ClientApp: nothing of the bundle is written or imported before it is verified."""
        import hashlib

        digest = hashlib.sha256(fab).hexdigest()
        if self.only_sha256 is not None and digest != self.only_sha256:
            raise WrongApp(f"this runner serves app {self.only_sha256[:16]}…; the task's bundle is {digest[:16]}…")
        fab_id = getattr(run, "fab_id")
        if self.key is None:
            log(WARNING, "app %s runs unverified (--unsigned-apps)", fab_id)
        elif digest in self.verified:
            log(DEBUG, "app %s: bundle sha256 %s verified earlier in this process", fab_id, digest)
        else:
            signature = self.verify_fab(fab, self.key)
            self.verified.add(digest)
            log(INFO, "app %s verified: %d files signed by publisher key %s", fab_id,
                len(signature.files), self.fingerprint(self.key))
        if self.loaded is not None:
            loaded_digest, app_dir, packages, client_app = self.loaded
            if loaded_digest != digest:  # unreachable with only_sha256; a task process loads one app
                raise WrongApp(f"app {loaded_digest[:16]}… is loaded here; the task's bundle is {digest[:16]}…")
            check_loaded_from(app_dir, packages)  # nothing of the app came from elsewhere since
            return client_app  # type: ignore[return-value]
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.supercore.utils import get_flwr_home

        app_dir = install_from_fab(fab, install_dir=get_flwr_home() / INSTALL_DIR / digest, skip_prompt=True)
        packages = app_packages(fab)
        dropped = forget_modules(packages)
        log(DEBUG, "loading the ClientApp from %s (dropped %d preloaded modules)", app_dir, len(dropped))
        load_client_app_fn = get_load_client_app_fn(default_app_ref="", app_path=str(app_dir), multi_app=True)
        client_app = load_client_app_fn(fab_id, getattr(run, "fab_version"), digest)
        log(INFO, "ClientApp loaded from %s (%d modules of the app)", app_dir, check_loaded_from(app_dir, packages))
        self.loaded = (digest, Path(app_dir), packages, client_app)
        return client_app


def run_task(runtime_api_address: str, token: str, *, publisher_key: Path | None,
             parent_pid: int | None) -> None:
    """One ClientApp task in this process, then exit as Flower's `flwr-clientapp` does."""
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.exit import flwr_exit, register_signal_handlers
    from flwr.supercore.telemetry import EventType

    executor = TaskExecutor(runtime_api_address, publisher_key)
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    register_signal_handlers(event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE, exit_message="Task stopped.",
                             exit_handlers=[executor.on_exit])
    exit_code = executor.execute(token)
    flwr_exit(code=exit_code, event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE)


def run_runner(runtime_api_address: str, app_sha256: str, tokens: Iterable[str], *,
               publisher_key: Path | None, parent_pid: int | None) -> int:
    """A warm runner: the tasks whose tokens arrive (one a line), in order, with the app loaded once.
    Leaves at the end of input, or after a refused bundle (it holds nothing of it)."""
    from flwr.supercore import log
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.exit import register_signal_handlers
    from flwr.supercore.telemetry import EventType

    executor = TaskExecutor(runtime_api_address, publisher_key, only_sha256=app_sha256)
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    register_signal_handlers(event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE, exit_message="Runner stopped.",
                             exit_handlers=[executor.on_exit])
    log(INFO, "app runner %d: serves app sha256 %s", os.getpid(), app_sha256)
    handled = 0
    for line in tokens:
        token = line.strip()
        if not token:
            continue
        code = executor.execute(token)
        handled += 1
        log(INFO, "app runner %d: task %d done (exit code %d)", os.getpid(), handled, code)
        if executor.refused:
            log(INFO, "app runner %d: leaves, its app refused", os.getpid())
            return 1
    return 0


def show_silotune_log() -> None:
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
