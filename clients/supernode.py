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

import os
import subprocess
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
from runtime.keys import write_private


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
        """
        if self.proc is not None:
            raise RuntimeError("SuperNode already started")
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
        cmd = [
            flower_executable("flower-supernode"),
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
                                         secret_file=secret_file),
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
