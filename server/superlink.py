"""A Flower SuperLink as a child process, and the `flwr` CLI calls that drive it.

flwr 1.41 serves the SuperLink's Fleet API (SuperNodes), Control API (`flwr`
CLI) and Runtime API (ServerApp processes) over HTTP on a single port
(`--host`, `--port`); there are no separate fleet/control/serverappio ports
any more. With `--isolation subprocess` the SuperLink starts a
`flower-superexec` child, which starts one `flwr-serverapp` per run.

Runs are submitted the way users do it: a connection named
`CONNECTION_NAME` is written into `$FLWR_HOME/config.toml` and `flwr run`,
`flwr ls`, `flwr log`, `flwr stop`, `flwr supernode list` are called with
`--format json` where they have it. Every process started here is stopped by
PID together with its descendants (runtime.flower_processes.stop_process_tree).

The SuperExec asks the SuperLink for a run to launch every
`SUPEREXEC_POLL_SECONDS` instead of Flower's every second: those asks were most
of what an idle coordinator's process tree cost (benchmarks/idle_coordinator.py);
a submitted run starts at most that much later.

The SuperLink runs through server/superlink_main.py, which paces its
database sessions and scopes its middleware before handing over to Flower's
own `flower-superlink` main: every object a message consists of costs it one
request and several SQL transactions (`SuperLinkProcess.start(paced=False)`
runs Flower's unchanged).

Loopback only: because that one port also carries the Control API, which
has no account login in flwr 1.41, the SuperLink listens on 127.0.0.1 only
and `start` refuses any other host. What is reachable from other
hosts is server/gateway.py: it forwards the Fleet API to organizations and,
on the operator listener (mutual TLS with an operator certificate), the
Control API to remote operators. Whoever runs on the coordinator host
dials the SuperLink directly (`flwr` CLI, `silotune pki enroll/revoke`, the
ServerApp processes).

Security (see server/pki.py and server/enrollment.py): with `tls=` the
SuperLink serves HTTPS (`--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`; the
one port carries Fleet, Control and Runtime APIs, so all three are
encrypted), the CLI connection gets `root-certificates` instead of
`insecure = true`, and with `node_auth=True` the SuperLink runs with
`--enable-supernode-auth`: only SuperNodes whose public key was registered
with `flwr supernode register` (`register_node`) may connect. `insecure=True`
(the default of this class, for tests and local experiments) is plain HTTP
without node authentication.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from runtime.flower_processes import (
    dial_address,
    dial_host,
    LOCALHOST,
    ManagedProcess,
    flower_env,
    flower_executable,
    free_port,
    render_flwr_config,
    stop_process_tree,
    wait_for_port,
)

CONNECTION_NAME = "silotune"
LOOPBACK = (LOCALHOST, "localhost")  # the only hosts a SuperLink may listen on
FINISHED = "finished"  # run status prefix: finished:completed|failed|stopped
#: with node authentication, the ServerApp (started by the SuperLink, inheriting its environment)
#: finds the enrollment registry, node id → enrolled name, in this state dir (server/validation.py)
ENROLLMENT_STATE_ENV = "SILOTUNE_ENROLLMENT_STATE_DIR"
#: Flower's SuperExec reads its poll interval from this variable (1 s by default); one ask costs the
#: SuperLink and the SuperExec about 17 ms of CPU together: 2% of a core at 1 s, for as long as it runs
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_SECONDS = 3.0  # unless the environment sets SUPEREXEC_POLL_ENV itself


class SuperLinkExposed(ValueError):
    """A SuperLink was asked to listen on a non-loopback address (its port carries the Control API)."""


class FlwrCliError(RuntimeError):
    """A `flwr` CLI call failed (non-zero exit or `"success": false`)."""


def flwr_cli_env(state_dir: Path | str) -> dict[str, str]:
    """Environment for `flwr` CLI calls against the SuperLink whose state is `state_dir`.

    FLWR_HOME is `state_dir/flwr-home`, where `SuperLinkProcess.start` wrote
    the connection (address, TLS root certificate) as `[superlink.silotune]`;
    so another process (e.g. `silotune pki enroll`) can drive a running
    SuperLink knowing only its state dir.
    """
    return flower_env(Path(state_dir).resolve() / "flwr-home")


def run_flwr(
    state_dir: Path | str, *args: str, env: Mapping[str, str] | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run the `flwr` CLI with `state_dir`'s FLWR_HOME; raise FlwrCliError on failure."""
    cmd = [flower_executable("flwr"), *args]
    res = subprocess.run(
        cmd, env=dict(env) if env is not None else flwr_cli_env(state_dir),
        cwd=Path(state_dir).resolve(), capture_output=True,
        text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False,
    )
    if res.returncode != 0:
        raise FlwrCliError(f"{' '.join(args[:2])} exited {res.returncode}: "
                           f"{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return res


def run_flwr_json(
    state_dir: Path | str, *args: str, env: Mapping[str, str] | None = None, timeout: float = 120.0
) -> dict[str, Any]:
    """`flwr ... --format json`; the JSON is stdout (errors also exit 0)."""
    try:
        res = run_flwr(state_dir, *args, "--format", "json", env=env, timeout=timeout)
    except FlwrCliError as err:
        # Some failures (e.g. an invalid key) exit non-zero with JSON on stdout.
        detail = _json_error(str(err))
        raise FlwrCliError(f"{' '.join(args[:2])} failed: {detail}" if detail else str(err)) from None
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError as err:
        raise FlwrCliError(f"{' '.join(args[:2])}: no JSON in output: "
                           f"{res.stdout[-2000:]}{res.stderr[-2000:]}") from err
    if not data.get("success"):
        raise FlwrCliError(f"{' '.join(args[:2])} failed: "
                           f"{data.get('error-message', data)}")
    return data


def _json_error(text: str) -> str | None:
    match = re.search(r'\{"success": false.*?\}', text)
    if not match:
        return None
    try:
        return str(json.loads(match.group(0)).get("error-message")) or None
    except json.JSONDecodeError:
        return None


def toml_string(value: str) -> str:
    """A TOML basic string (for paths in config.toml)."""
    return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes


class ServerTls(Protocol):
    """The SuperLink's TLS files (server.pki.ServerFiles is one)."""

    ca_cert: Path
    cert: Path
    key: Path


class SuperLinkProcess(ManagedProcess):
    """`flower-superlink` on 127.0.0.1 with its state under one directory.

    Layout of `state_dir`: `state.db` (nodes and runs, survives restarts),
    `superlink.log` (stdout+stderr of the SuperLink and of the ServerApp
    processes it starts), `flwr-home/` (FLWR_HOME: the CLI's config.toml and
    the installed FABs).
    """

    what = "SuperLink"

    def __init__(self) -> None:
        super().__init__()
        self.state_dir: Path | None = None
        self.port: int | None = None
        self.env: dict[str, str] = {}
        self.host: str = LOCALHOST
        self.tls: ServerTls | None = None
        self.node_auth = False
        self._control_client: Any = None

    def stop(self, grace: float = 10.0) -> list[int]:
        if self._control_client is not None:
            self._control_client.close()
            self._control_client = None
        return super().stop(grace)

    # ------------------------------------------------------------ lifecycle
    def start(
        self,
        state_dir: Path | str,
        *,
        insecure: bool = True,
        tls: ServerTls | None = None,
        node_auth: bool = False,
        host: str = LOCALHOST,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        timeout: float = 60.0,
        paced: bool = True,
    ) -> SuperLinkProcess:
        """Launch the SuperLink and wait until its HTTP port accepts connections.

        `insecure=True`: plain HTTP, no node authentication (as before).
        `insecure=False` needs `tls` (anything with `ca_cert`, `cert`, `key`
        paths, e.g. server.pki.ServerFiles); `node_auth=True` adds
        `--enable-supernode-auth` (Flower requires TLS for it). `host` is the
        bind address: loopback only (127.0.0.1 by default, or localhost); anything
        else raises SuperLinkExposed, because the same port serves the
        Control API without a login. Remote agents reach the Fleet API
        through server/gateway.py. The certificate must name the loopback
        address the CLI dials (pki adds 127.0.0.1 and localhost).
        `paced=True` starts it through server/superlink_main.py (database
        sessions one at a time, status reads' token cleanup throttled, API-only
        middleware skipped by the other APIs' requests: the cost of its many
        small object requests); False runs Flower's `flower-superlink` unchanged.
        """
        if self.proc is not None:
            raise RuntimeError("SuperLink already started")
        if insecure and (tls is not None or node_auth):
            raise ValueError("insecure=True excludes tls= and node_auth=True")
        if not insecure and tls is None and not extra_args:
            raise ValueError("insecure=False needs tls= (CA certificate, server certificate "
                             "and key; see server.pki)")
        if node_auth and tls is None:
            raise ValueError("node_auth=True needs tls= (Flower refuses node auth without TLS)")
        if host not in LOOPBACK:
            raise SuperLinkExposed(
                f"the SuperLink listens on loopback only, not {host!r}: its port also serves the "
                "Control API (start runs, register/unregister nodes) with no login; expose the "
                "Fleet API to organizations through server/gateway.py (`silotune coordinator "
                "--bind/--port`)")
        self.state_dir = Path(state_dir).resolve()
        flwr_home = self.state_dir / "flwr-home"
        flwr_home.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(dial_host(host))
        self.log_path = self.state_dir / "superlink.log"
        extra = {ENROLLMENT_STATE_ENV: str(self.state_dir)} if node_auth else {}
        if SUPEREXEC_POLL_ENV not in os.environ:   # the SuperExec is the SuperLink's child: it inherits this
            extra[SUPEREXEC_POLL_ENV] = str(SUPEREXEC_POLL_SECONDS)
        self.env = flower_env(flwr_home, tag=self.tag, extra=extra)
        self.tls = tls
        self.node_auth = node_auth
        tls_args: list[str] = []
        if tls is not None:
            tls_args = ["--ssl-ca-certfile", str(Path(tls.ca_cert).resolve()),
                        "--ssl-certfile", str(Path(tls.cert).resolve()),
                        "--ssl-keyfile", str(Path(tls.key).resolve())]
        cmd = [
            *([sys.executable, "-P", "-m", "server.superlink_main", "--"] if paced
              else [flower_executable("flower-superlink")]),
            "--isolation", "subprocess",
            "--host", host,
            "--port", str(self.port),
            "--database", str(self.state_dir / "state.db"),
            "--disable-runtime-dependency-installation",
            *(["--insecure"] if insecure else []),
            *tls_args,
            *(["--enable-supernode-auth"] if node_auth else []),
            *extra_args,
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
                cmd, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=self.env, cwd=self.state_dir,
            )
        try:
            wait_for_port(self.dial_host, self.port, timeout, proc=self.proc,
                          log_path=self.log_path, what="flower-superlink")
        except BaseException:
            self.stop()
            raise
        self._write_connection(insecure=insecure)
        return self

    @property
    def dial_host(self) -> str:
        """The host this machine dials to reach the SuperLink (loopback for a bind-all host)."""
        return dial_host(self.host)

    @property
    def address(self) -> str:
        """host:port of the single HTTP API (Fleet, Control and Runtime), as dialled locally."""
        return dial_address(self.host, self.port)

    # SuperNodes' `--superlink` and the CLI connection both use the one port.
    fleet_address = address
    control_address = address


    # ----------------------------------------------------------- flwr CLI
    def _write_connection(self, *, insecure: bool) -> None:
        """Put `[superlink.silotune]` into $FLWR_HOME/config.toml (the CLI reads it).

        With TLS the connection names the CA certificate (`root-certificates`,
        an absolute path, as the CLI requires) and `insecure = false`.
        """
        assert self.state_dir is not None
        config = self.state_dir / "flwr-home" / "config.toml"
        lines = [
            "[superlink]",
            f'default = "{CONNECTION_NAME}"',
            "",
            f"[superlink.{CONNECTION_NAME}]",
            f'address = "{self.address}"',
            f"insecure = {'true' if insecure else 'false'}",
        ]
        if self.tls is not None:
            lines.append(f"root-certificates = {toml_string(str(Path(self.tls.ca_cert).resolve()))}")
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run the `flwr` CLI against this SuperLink; raise FlwrCliError on failure."""
        if self.state_dir is None:
            raise RuntimeError("SuperLink not started")
        return run_flwr(self.state_dir, *args, env=self.env, timeout=timeout)

    def _flwr_json(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """`flwr ... --format json`; the JSON is stdout (errors also exit 0)."""
        if self.state_dir is None:
            raise RuntimeError("SuperLink not started")
        return run_flwr_json(self.state_dir, *args, env=self.env, timeout=timeout)

    def submit_run(
        self,
        app_dir: Path | str,
        run_config: Mapping[str, object] | None = None,
        *,
        stream: bool = False,
        timeout: float = 300.0,
    ) -> int:
        """`flwr run <app_dir> silotune --run-config ...`; return the run ID.

        The FAB is built from `app_dir` by the CLI (its .gitignore is
        honoured; only .py/.toml/.md/.yaml/.yml/.json/.jsonl/LICENSE files;
        at most 10 MB). Run-config keys must already exist in the app's
        `[tool.flwr.app.config]`, or the SuperLink refuses the run.
        With `stream=True` this blocks until the run ends and appends its
        logs to `state_dir/flwr-run-stream.log`.
        """
        args = ["run", str(Path(app_dir).resolve()), CONNECTION_NAME]
        if run_config:
            args += ["--run-config", render_flwr_config(run_config)]
        if not stream:
            data = self._flwr_json(*args, timeout=timeout)
            return int(data["run-id"])
        # `--stream` output is swallowed in JSON mode: parse the plain text.
        res = self._flwr(*args, "--stream", timeout=timeout)
        assert self.state_dir is not None
        with open(self.state_dir / "flwr-run-stream.log", "a", encoding="utf-8") as fh:
            fh.write(res.stdout + res.stderr)
        match = re.search(r"Successfully started run (\d+)", res.stdout + res.stderr)
        if not match:
            raise FlwrCliError(f"flwr run: no run ID in output: {res.stdout[-2000:]}")
        return int(match.group(1))

    def run_info(self, run_id: int) -> dict[str, Any]:
        """The run's row from `flwr ls --run-id N --format json` (status, details, times)."""
        data = self._flwr_json("ls", CONNECTION_NAME, "--run-id", str(run_id), timeout=60)
        return data["runs"][0]

    def run_status(self, run_id: int) -> str:
        """'pending', 'starting', 'running' or 'finished:completed|failed|stopped'.

        Asked over one long-lived Control API connection in this process (Flower's own
        protobuf-over-HTTP client, as `flwr ls` uses), not by starting a `flwr` process:
        ``wait_for_run`` asks every few seconds for as long as a run lasts."""
        from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=no-name-in-module

        runs = self._control().ListRuns(ListRunsRequest(run_id=run_id)).run_dict
        if run_id not in runs:
            raise FlwrCliError(f"the SuperLink knows no run {run_id}")
        status = runs[run_id].status
        return f"{status.status}:{status.sub_status}" if status.sub_status else str(status.status)

    def _control(self) -> Any:
        """The Control API client (created once, closed in ``stop``)."""
        if self._control_client is None:
            from flwr.supercore.control.control_http_client import ControlHttpClient
            from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

            tls = self.tls
            self._control_client = ControlHttpClient.from_server_address(
                server_address=self.address, insecure=tls is None,
                root_certificates=None if tls is None else Path(tls.ca_cert).read_bytes(),
                interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")])
        return self._control_client

    def wait_for_run(self, run_id: int, timeout: float = 600.0, poll: float = 2.0) -> str:
        """Poll until the run is finished; return its final status string."""
        deadline = time.monotonic() + timeout
        status = "unknown"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"SuperLink died while waiting for run {run_id}:\n"
                                   f"{self.log_tail()}")
            status = self.run_status(run_id)
            if status.startswith(FINISHED):
                return status
            time.sleep(poll)
        raise TimeoutError(f"run {run_id} still {status!r} after {timeout:.0f}s. "
                           f"SuperLink log tail:\n{self.log_tail()}")

    def run_logs(self, run_id: int, timeout: float = 60.0) -> str:
        """The run's ServerApp log as stored by the SuperLink.

        For a finished run `flwr log N --stream` returns everything and exits;
        for an unfinished one, `--show` prints what there is (one chunk) without
        waiting for the end.
        """
        finished = self.run_status(run_id).startswith(FINISHED)
        mode = "--stream" if finished else "--show"
        res = self._flwr("log", str(run_id), CONNECTION_NAME, mode, timeout=timeout)
        return res.stdout

    def follow_run_log(self, run_id: int, on_line: Callable[[str], None]) -> "RunLogFollower":
        """Relay the run's ServerApp log, line by line, while it runs (one long-lived
        `flwr log --stream` process, not a poll); stop it with ``.stop()``."""
        if self.state_dir is None:
            raise RuntimeError("SuperLink not started")
        return RunLogFollower(
            [flower_executable("flwr"), "log", str(run_id), CONNECTION_NAME, "--stream"],
            env=self.env, cwd=Path(self.state_dir),
            on_line=on_line)

    def stop_run(self, run_id: int) -> None:
        """`flwr stop N`: the run ends as 'finished:stopped'."""
        self._flwr_json("stop", str(run_id), CONNECTION_NAME, timeout=60)

    def online_node_ids(self) -> list[int]:
        """IDs of the SuperNodes online now (what `flwr supernode list` shows as 'online'), asked
        over the in-process Control API connection: a coordinator waiting for its agents asks
        this every few seconds, and a `flwr` process per ask would cost more than the wait."""
        from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=no-name-in-module

        if self.exited is not None:   # a named error, not a refused connection, for whoever waits
            raise RuntimeError(f"SuperLink exited with {self.exited} while nodes were awaited:\n{self.log_tail()}")
        nodes = self._control().ListNodes(ListNodesRequest()).nodes_info
        return sorted(node.node_id for node in nodes if node.status == "online")

    def list_nodes(self) -> list[dict[str, Any]]:
        """`flwr supernode list`: dicts with 'node-id', 'status' ('online', ...)."""
        return list(self._flwr_json("supernode", "list", CONNECTION_NAME, timeout=60)["nodes"])

    def wait_for_nodes(self, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Wait until at least `count` SuperNodes are online; return them."""
        deadline = time.monotonic() + timeout
        online: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            online = [n for n in self.list_nodes() if n.get("status") == "online"]
            if len(online) >= count:
                return online
            time.sleep(0.5)
        raise TimeoutError(f"{len(online)}/{count} SuperNodes online after {timeout:.0f}s")

    # ------------------------------------------------------- node auth
    def register_node(self, public_key: Path | str, name: str | None = None) -> int:
        """`flwr supernode register PUBKEY`: allow the holder of that key to connect.

        `public_key` is an OpenSSH ECDSA public key on a NIST curve. Returns
        the node ID the SuperLink assigned; the SuperNode that signs with the
        matching private key gets this ID when it connects.
        """
        args = ["supernode", "register", str(Path(public_key).resolve()), CONNECTION_NAME]
        if name:
            args += ["--name", name]
        return int(self._flwr_json(*args, timeout=60)["node-id"])

    def unregister_node(self, node_id: int) -> None:
        """`flwr supernode unregister NODE_ID`: that key can no longer connect."""
        self._flwr_json("supernode", "unregister", str(node_id), CONNECTION_NAME, timeout=60)


class RunLogFollower:
    """A `flwr log --stream` process whose output lines go to ``on_line`` from a thread."""

    def __init__(self, cmd: list[str], *, env: Mapping[str, str], cwd: Path, on_line: Callable[[str], None]) -> None:
        self.proc = subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, errors="replace")
        self._thread = threading.Thread(target=self._relay, args=(on_line,), daemon=True)
        self._thread.start()

    def _relay(self, on_line: Callable[[str], None]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            on_line(line.rstrip("\n"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_process_tree(self.proc.pid, grace=3.0)
        self._thread.join(timeout=5.0)
