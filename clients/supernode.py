"""A Flower SuperNode as a child process: one organization's connection to the SuperLink.

`flower-supernode` (flwr 1.41) registers with the SuperLink's Fleet API
(`--superlink host:port`, the SuperLink's single HTTP port), serves its own
Runtime (ClientAppIo) API on `--host/--port` (default 9094, so a free port is
always passed). It runs with `--isolation process`: it launches nothing
itself; our app launcher (clients/app_launcher.py), started beside it as part
of this process group, takes each message's task from the Runtime API
(signed with a per-start SuperExec secret, `superexec.secret`, 0600) and runs
it in a ClientApp process of ours that checks the app bundle against the
federation's publisher key (`app_publisher_key`, runtime/app_signature.py)
before installing or importing anything of it. Without a key, every app runs
(as with Flower's own `flower-superexec`); `silotune agent start` refuses that
unless told (`--insecure` or `--unsigned-apps`).

The organization's settings reach the ClientApp as `context.node_config`,
passed here as a dict (e.g. {"silo-path": "/data/silo.jsonl"}, or an agent's
named datasets as one string, {"silo-paths": "legal=/data/a.jsonl;tax=/data/b.csv"}:
Flower's node-config values are scalars, clients/node_config.py) and rendered
to Flower's `--node-config 'k="v" n=1'` syntax. Runtime dependency
installation stays off (the SuperNode default; we never pass
`--allow-runtime-dependency-installation`). Stopping kills the process and
all its descendants by PID.

Pacing: Flower 1.41's SuperNode sleeps 3 s after every pull that found no
message and checks for the ClientApp's reply every 0.5 s, both hard-coded in
`flwr/supernode/start_client_internal.py` (no option, no environment
variable); together ~2 s of every message's round trip, against a 1 s budget
for the whole overhead. So by default the SuperNode runs through this
module's entry point (`python -m clients.supernode --pull-interval S
--reply-wait S -- <flower-supernode arguments>`), which hands that module a
`time` whose `sleep` turns those two waits into `pull_interval` (0.5 s) and
`reply_wait` (0.05 s), checks first that the installed Flower has exactly
those waits (else it refuses to start, naming them), shortens its retry for
message objects the SuperLink does not hold yet (runtime/flower_backoff.py),
then runs Flower's own `flower-supernode` main. The cost: an idle SuperNode asks the SuperLink for
messages every `pull_interval` instead of every 3 s (6x the idle requests:
for 100 organizations, 200 small HTTP requests a second at the SuperLink);
the reply wait only reads the SuperNode's own state. `pull_interval=None`
runs Flower's `flower-supernode` unchanged.

Security: `insecure=True` (this class's default, for tests and local
experiments) connects over plain HTTP without node authentication. With
`insecure=False`, `root_certificates` (the federation's CA certificate,
`--root-certificates`) makes the connection HTTPS and verifies the
SuperLink's certificate, and `auth_private_key` (the organization's OpenSSH
ECDSA key, `--auth-supernode-private-key`) signs every Fleet request, so a
SuperLink with `--enable-supernode-auth` accepts this node only if the
matching public key was registered (`flwr supernode register`).
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from clients import app_launcher
from runtime.flower_processes import (
    LOCALHOST,
    flower_env,
    flower_executable,
    ManagedProcess,
    free_port,
    render_flwr_config,
    stop_process_tree,
    wait_for_port,
)
from runtime.flower_backoff import FlowerPacingUnsupported, shorten_object_backoff
from runtime.keys import write_private

#: Flower 1.41's own waits in start_client_internal.py: after an empty pull, and per reply check
FLWR_IDLE_WAIT, FLWR_REPLY_WAIT = 3, 0.5
#: ours: seconds between an idle SuperNode's pulls from the SuperLink, and between its reply checks
PULL_INTERVAL, REPLY_WAIT = 0.5, 0.05
#: the app launcher's AcquireTask poll (clients/app_launcher.py), a local call
TASK_POLL = 0.1
#: retry for message objects the SuperLink does not hold yet (runtime/flower_backoff.py; Flower: 1 s, cap 10 s):
#: while the coordinator is still pushing them, at most ~5 small requests a second per waiting organization
OBJECT_BACKOFF, OBJECT_BACKOFF_CAP = 0.05, 0.2


class PacedTime:
    """The `time` module as start_client_internal sees it: the same, but for Flower's two waits."""

    def __init__(self, pull_interval: float, reply_wait: float) -> None:
        self.waits = {FLWR_IDLE_WAIT: pull_interval, FLWR_REPLY_WAIT: reply_wait}

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(self.waits.get(seconds, seconds))


def flower_waits(source: str) -> list[float]:
    """The constant arguments of every `time.sleep(...)` call in a module's source, in order."""
    return [node.args[0].value for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "sleep"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "time"
            and node.args and isinstance(node.args[0], ast.Constant)]


def pace_flower_supernode(pull_interval: float, reply_wait: float) -> None:
    """Shorten the SuperNode's waits in this process; FlowerPacingUnsupported if Flower changed them."""
    import inspect

    import flwr.supernode.start_client_internal as loop

    found = sorted(flower_waits(inspect.getsource(loop)))
    if found != sorted([FLWR_IDLE_WAIT, FLWR_REPLY_WAIT, FLWR_REPLY_WAIT]):
        raise FlowerPacingUnsupported(
            f"{loop.__file__} waits {found} s, not the {FLWR_IDLE_WAIT} s idle and {FLWR_REPLY_WAIT} s reply "
            "waits of flwr 1.41: check the new ones, or run Flower's SuperNode as is (pull_interval=None)")
    loop.time = PacedTime(pull_interval, reply_wait)  # type: ignore[attr-defined]
    shorten_object_backoff(loop, "pull_objects", OBJECT_BACKOFF, OBJECT_BACKOFF_CAP)


def check_interval(name: str, seconds: float) -> float:
    if not 0 < seconds <= 60:
        raise ValueError(f"{name} must be in (0, 60] seconds, got {seconds}")
    return float(seconds)


class SuperNodeProcess(ManagedProcess):
    """`flower-supernode` with its log and FLWR_HOME under one directory.

    Layout of `state_dir`: `supernode.log` (stdout+stderr of the SuperNode, of
    the app launcher and of the ClientApp processes it starts), `flwr-home/`
    (FLWR_HOME; verified apps are installed under `flwr-home/silotune-apps/`),
    `superexec.secret` (0600, new at every start).
    """

    what = "SuperNode"

    def __init__(self) -> None:
        super().__init__()
        self.state_dir: Path | None = None
        self.port: int | None = None
        self.launcher: subprocess.Popen[bytes] | None = None
        self.app_publisher_key: Path | None = None

    def start(
        self,
        superlink_fleet_address: str,
        node_config: Mapping[str, object] | None,
        state_dir: Path | str,
        *,
        insecure: bool = True,
        root_certificates: Path | str | None = None,
        auth_private_key: Path | str | None = None,
        app_publisher_key: Path | str | None = None,
        max_wait_time: float | None = None,
        pull_interval: float | None = PULL_INTERVAL,
        reply_wait: float = REPLY_WAIT,
        task_poll: float = TASK_POLL,
        warm_runner: bool = False,
        extra_args: Sequence[str] = (),
        timeout: float = 60.0,
    ) -> SuperNodeProcess:
        """Launch the SuperNode; return once its Runtime API port is open.

        The SuperNode connects to the SuperLink afterwards, retrying without
        limit unless `max_wait_time` (seconds) is given, after which it exits.
        A SuperLink with node authentication that does not know this node's
        key refuses it at once, and the SuperNode exits (see `exited`).
        Use SuperLinkProcess.wait_for_nodes to wait for registration.

        `app_publisher_key` (the federation's `publisher.pub`): only app
        bundles signed with it run; others get an error reply naming why and
        are never installed nor imported. None: every app runs unverified.

        `pull_interval`/`reply_wait`: the SuperNode's pacing (module doc;
        None: Flower's own 3 s / 0.5 s). `task_poll`: the app launcher's
        AcquireTask interval. `warm_runner`: the launcher keeps one process
        per app for all its tasks (the agent's resident mode) instead of one
        process per task.
        """
        if self.proc is not None:
            raise RuntimeError("SuperNode already started")
        pacing: list[str] = []
        if pull_interval is not None:
            pacing = ["--pull-interval", repr(check_interval("pull_interval", pull_interval)),
                      "--reply-wait", repr(check_interval("reply_wait", reply_wait))]
        check_interval("task_poll", task_poll)
        if insecure and (root_certificates is not None or auth_private_key is not None):
            raise ValueError("insecure=True excludes root_certificates and auth_private_key")
        if not insecure and root_certificates is None and not extra_args:
            raise ValueError("insecure=False needs root_certificates (the federation's CA "
                             "certificate; see server.pki / `silotune pki init`)")
        security: list[str] = []
        if root_certificates is not None:
            security += ["--root-certificates", str(Path(root_certificates).resolve())]
        if auth_private_key is not None:
            security += ["--auth-supernode-private-key", str(Path(auth_private_key).resolve())]
        if app_publisher_key is not None:
            from runtime.app_signature import load_publisher_public_key

            load_publisher_public_key(app_publisher_key)  # a bad key file fails before anything starts
            self.app_publisher_key = Path(app_publisher_key).resolve()
        self.state_dir = Path(state_dir).resolve()
        flwr_home = self.state_dir / "flwr-home"
        flwr_home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.state_dir / "supernode.log"
        secret_file = write_private(self.state_dir / "superexec.secret", os.urandom(32))
        # -P: the working directory is not put on sys.path (nothing there may shadow a module)
        entry = ([flower_executable("flower-supernode")] if pull_interval is None
                 else [sys.executable, "-P", "-m", "clients.supernode", *pacing, "--"])
        cmd = [
            *entry,
            "--superlink", superlink_fleet_address,
            "--host", LOCALHOST,
            "--port", str(self.port),
            "--isolation", "process",  # our app launcher runs the ClientApps (clients/app_launcher.py)
            "--superexec-auth-secret-file", str(secret_file),
            *(["--insecure"] if insecure else []),
            *security,
            *(["--node-config", render_flwr_config(node_config)] if node_config else []),
            *(["--max-wait-time", str(max_wait_time)] if max_wait_time else []),
            *extra_args,
        ]
        env = flower_env(flwr_home, tag=self.tag)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=self.state_dir,
            )
        try:
            wait_for_port(LOCALHOST, self.port, timeout, proc=self.proc,
                          log_path=self.log_path, what="flower-supernode")
            with open(self.log_path, "ab") as log:
                self.launcher = subprocess.Popen(  # pylint: disable=consider-using-with
                    app_launcher.command(app_launcher.SERVE, self.runtime_address,
                                         publisher_key=self.app_publisher_key, parent_pid=self.proc.pid,
                                         secret_file=secret_file, warm_runner=warm_runner,
                                         poll_interval=task_poll),
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=self.state_dir,
                )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 10.0) -> list[int]:
        """Stop the app launcher (and its ClientApp processes), then the SuperNode; all by PID."""
        stopped: list[int] = []
        if self.launcher is not None:
            stopped += stop_process_tree(self.launcher.pid, grace=grace)
            try:
                self.launcher.wait(timeout=5)  # reap it (no zombie)
            except subprocess.TimeoutExpired:
                pass
            self.launcher = None
        stopped += super().stop(grace)
        self.stopped_pids = sorted(set(stopped))
        return self.stopped_pids

    @property
    def exited(self) -> int | None:
        """Exit code if the SuperNode, or its app launcher, has ended by itself, else None."""
        code = super().exited
        if code is None and self.launcher is not None:
            code = self.launcher.poll()
        return code

    @property
    def runtime_address(self) -> str:
        """host:port of this SuperNode's Runtime (ClientAppIo) HTTP API."""
        return f"{LOCALHOST}:{self.port}"


def main(argv: Sequence[str] | None = None) -> None:
    """`flower-supernode` with its waits paced (module doc): our options, `--`, then Flower's."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, flower_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m clients.supernode",
                                     description="flower-supernode, its idle and reply waits shortened")
    parser.add_argument("--pull-interval", type=float, default=PULL_INTERVAL,
                        help=f"seconds between pulls when idle (Flower: {FLWR_IDLE_WAIT})")
    parser.add_argument("--reply-wait", type=float, default=REPLY_WAIT,
                        help=f"seconds between checks for the ClientApp's reply (Flower: {FLWR_REPLY_WAIT})")
    args = parser.parse_args(ours)
    try:
        pull_interval = check_interval("--pull-interval", args.pull_interval)
        reply_wait = check_interval("--reply-wait", args.reply_wait)
    except ValueError as err:
        parser.error(str(err))
    pace_flower_supernode(pull_interval, reply_wait)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    print(f"SuperNode pacing: pull every {pull_interval} s when idle, reply check every {reply_wait} s",
          file=sys.stderr, flush=True)
    sys.argv = ["flower-supernode", *flower_args]  # Flower parses sys.argv and names itself by argv[0]
    flower_supernode()


if __name__ == "__main__":
    main()
