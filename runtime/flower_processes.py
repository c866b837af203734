"""Process helpers shared by the SuperLink (server/) and SuperNode (clients/) wrappers.

Both sides start Flower's own command-line processes (`flower-superlink`,
`flower-supernode`, the `flwr` CLI) and need the same small toolbox: a free
localhost port, a wait until a port accepts connections, a clean stop of a
process *and everything it spawned*, the environment those processes run in,
and the `key=value` syntax Flower uses for `--run-config` / `--node-config`.

Facts about flwr 1.41 this relies on (read from its source):

- `flower-superlink` serves the Fleet, Control and Runtime (ServerAppIo) APIs
  over HTTP on ONE port (`--host`, `--port`); `--fleet-api-address`,
  `--control-api-address` are deprecated and ignored unless Flower's internal
  gRPC toggles are set; `--serverappio-api-address` is rejected.
- `flower-supernode` serves its Runtime (ClientAppIo) API on `--host/--port`
  (default 9094, so always pass a free one); `--clientappio-api-address` is
  rejected.
- Both start a `flower-superexec` child (the SuperLink's one in a new session)
  that launches `flwr-serverapp` / `flwr-clientapp`; stopping therefore walks
  the whole tree via psutil, snapshotted *before* the first signal.

Nothing here imports other silotune code.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import psutil

LOCALHOST = "127.0.0.1"
BIND_ALL = ("0.0.0.0", "::", "[::]")  # bind-all hosts, dialled over 127.0.0.1


def dial_host(host: str) -> str:
    """The host this machine dials to reach a server bound to ``host`` (loopback for a bind-all host)."""
    return LOCALHOST if host in BIND_ALL else host


def dial_address(host: str, port: int) -> str:
    """host:port as dialled from this machine (IPv6 hosts in brackets)."""
    dialled = dial_host(host)
    return f"[{dialled}]:{port}" if ":" in dialled else f"{dialled}:{port}"


# --------------------------------------------------------------------------- ports
def free_port(host: str = LOCALHOST) -> int:
    """Return a TCP port that is free right now (bind port 0, read it, close).

    There is a small race until the caller binds it; callers that start a
    server on it should retry on "address in use" if that ever matters.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def log_tail(path: Path | str | None, lines: int = 40) -> str:
    """The last `lines` lines of a log file ('' if there is none)."""
    if path is None or not Path(path).exists():
        return ""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 64 * 1024))
        text = fh.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 30.0,
    *,
    proc: psutil.Popen | object | None = None,
    log_path: Path | str | None = None,
    what: str = "process",
) -> None:
    """Block until host:port accepts connections.

    If `proc` (anything with `.poll()`) exits first, raise RuntimeError at once;
    after `timeout` seconds raise TimeoutError. Both messages carry the tail of
    `log_path` so the caller sees why the process did not come up.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:  # type: ignore[attr-defined]
            raise RuntimeError(
                f"{what} exited with code {proc.poll()} before "  # type: ignore[attr-defined]
                f"{host}:{port} opened. Log tail ({log_path}):\n{log_tail(log_path)}"
            )
        if port_open(host, port):
            return
        time.sleep(0.1)
    raise TimeoutError(
        f"{what} did not open {host}:{port} within {timeout:.0f}s. "
        f"Log tail ({log_path}):\n{log_tail(log_path)}"
    )


# ----------------------------------------------------------------- process trees
def descendants(pid: int) -> list[psutil.Process]:
    """All live descendants of `pid` (children, grandchildren, ...)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def is_alive(pid: int) -> bool:
    """True if `pid` runs (zombies, already dead but not yet reaped, count as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def alive(pids: Iterable[int]) -> list[int]:
    """The subset of `pids` that still runs (see `is_alive`)."""
    return [pid for pid in pids if is_alive(pid)]


TAG_ENV = "SILOTUNE_PROCESS_TAG"


def new_tag() -> str:
    """A unique tag for one started process tree (see `flower_env`, `tagged`)."""
    return uuid.uuid4().hex


def tagged(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries TAG_ENV=`tag`.

    Every process Flower starts inherits its parent's environment, so this
    finds descendants that were re-parented to init (e.g. the SuperNode's
    `flower-superexec` when the SuperNode exited by itself), or that left
    the session. The tag is a fresh uuid per started process, so nothing
    else can carry it.
    """
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(TAG_ENV) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def stop_process_tree(pid: int, grace: float = 10.0, tag: str | None = None) -> list[int]:
    """Stop `pid` and all its descendants; return every PID that was in the tree.

    With `tag`, processes carrying that tag (see `tagged`) count as part of
    the tree too, even when `pid` is already gone.

    SIGTERM first (the root first, so Flower's own shutdown handlers can stop
    their SuperExec cleanly), then SIGTERM to the remaining descendants, then
    SIGKILL to whatever still runs after `grace` seconds. The tree is
    snapshotted before any signal, because children that lose their parent
    are re-parented to init and could no longer be found from `pid`; it is
    re-scanned after each step to catch processes spawned in the meantime.
    """
    tree: dict[int, psutil.Process] = {}
    try:
        root: psutil.Process | None = psutil.Process(pid)
        tree[pid] = root
    except psutil.NoSuchProcess:
        root = None

    def rescan() -> None:
        for proc in [*tree.values(), *(tagged(tag) if tag else [])]:
            tree.setdefault(proc.pid, proc)
            if not _running(proc):  # also guards against a reused PID
                continue
            try:
                for child in proc.children(recursive=True):
                    tree.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                pass

    def living() -> list[psutil.Process]:
        return [p for p in tree.values() if _running(p)]

    rescan()
    if root is not None:
        _signal(root, "terminate")
        # Give the root half the grace period to shut its own children down.
        psutil.wait_procs([root], timeout=grace / 2)
    rescan()
    for proc in living():
        _signal(proc, "terminate")
    _, still = psutil.wait_procs(living(), timeout=grace / 2)
    for _ in range(3):  # kill, re-scan for late spawns, repeat
        rescan()
        still = living()
        if not still:
            break
        for proc in still:
            _signal(proc, "kill")
        psutil.wait_procs(still, timeout=5)
    return sorted(tree)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal(proc: psutil.Process, how: str) -> None:
    try:
        getattr(proc, how)()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass


# ------------------------------------------------------------------ environment
def flower_env(
    flwr_home: Path, tag: str | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for Flower processes started by silotune.

    - FLWR_HOME: Flower's home (config.toml for the CLI, installed FABs, the
      local SuperLink's files) lives under our state dir, never in ~/.flwr.
    - FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1: the SuperLink reads it
      as the default of `--disable-runtime-dependency-installation` (SuperNodes
      never install unless `--allow-runtime-dependency-installation`).
    - no telemetry, no PyPI update check (there is no internet here).
    - the venv's bin dir first on PATH: Flower starts `flower-superexec`,
      `flwr-serverapp` and `flwr-clientapp` by bare name.
    - TAG_ENV=`tag` if given, so `stop_process_tree` finds orphaned descendants.
    """
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if tag:
        env[TAG_ENV] = tag
    env.update(extra or {})
    return env


def flower_executable(name: str) -> str:
    """Path of a Flower console script, preferring the running interpreter's venv."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


# --------------------------------------------------------------- config syntax
def render_flwr_config_value(value: object) -> str:
    """One value in Flower's `key=value` config syntax (a TOML literal).

    Flower splits `k1=v1 k2="v 2"` with the regex
    `(\\S+?)=('[^']*'|"[^"]*"|\\S+)` and parses each `k = v` as TOML, so:
    bools are `true`/`false`, ints and floats are bare, strings MUST be quoted
    (unquoted text is a TOML error). Strings go in '...' (TOML literal string,
    no escapes, so backslashes and '"' are safe); a string containing `'`
    goes in "..." with TOML escapes; one containing both quote kinds cannot
    pass through Flower's regex and is refused.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # '0.1', '1e-05': both valid TOML floats
    if isinstance(value, str):
        has_control = any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value)
        if "'" not in value and not has_control:
            return f"'{value}'"
        if '"' not in value:
            escaped = value.replace("\\", "\\\\")
            escaped = "".join(
                ch if ord(ch) >= 0x20 and ord(ch) != 0x7F else f"\\u{ord(ch):04x}"
                for ch in escaped
            )
            return f'"{escaped}"'
        raise ValueError(
            f"config string {value!r} contains both ' and \"; Flower's "
            "key=value syntax cannot carry it (use a TOML file for --run-config)"
        )
    raise TypeError(
        f"Flower config values are bool, int, float or str, not {type(value).__name__}"
    )


def render_flwr_config(config: Mapping[str, object]) -> str:
    """A dict as one Flower `--run-config` / `--node-config` string.

    Example: {"silo-path": "/x.jsonl", "num-rounds": 2} ->
    "silo-path='/x.jsonl' num-rounds=2". Nested dicts become dotted keys,
    which Flower flattens back the same way.
    """
    parts = []
    for key, value in config.items():
        if not key or any(ch.isspace() or ch in "='\"" for ch in key):
            raise ValueError(f"invalid Flower config key {key!r}")
        if isinstance(value, Mapping):
            inner = render_flwr_config({f"{key}.{k}": v for k, v in value.items()})
            if inner:
                parts.append(inner)
            continue
        parts.append(f"{key}={render_flwr_config_value(value)}")
    return " ".join(parts)


# ---------------------------------------------------------- local simulation
#: what a SuperLink's command line contains: Flower's script, or the paced entry point in front of it
#: (server/superlink_main.py) that the coordinator starts
SUPERLINK_COMMANDS = ("flower-superlink", "server.superlink_main")


def find_local_superlink_pid(http_port: int) -> int | None:
    """PID of the SuperLink (`SUPERLINK_COMMANDS`) listening on 127.0.0.1:`http_port`, if any.

    `flwr run` with a `:local:` connection starts a detached SuperLink
    (`flower-superlink --simulation ... --port $FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`)
    that outlives the CLI; this finds it so a test can stop it by PID.
    """
    for conn in psutil.net_connections(kind="tcp"):
        if (
            conn.status == psutil.CONN_LISTEN
            and conn.laddr
            and conn.laddr.port == http_port
            and conn.pid is not None
        ):
            try:
                cmdline = " ".join(psutil.Process(conn.pid).cmdline())
            except psutil.NoSuchProcess:
                continue
            if any(command in cmdline for command in SUPERLINK_COMMANDS):
                return conn.pid
    # net_connections may not report PIDs without privileges: scan processes.
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if any(command in part for part in cmd for command in SUPERLINK_COMMANDS) and _has_port_arg(cmd, http_port):
            return proc.pid
    return None


def _has_port_arg(cmd: list[str], port: int) -> bool:
    return any(a == "--port" and b == str(port) for a, b in zip(cmd, cmd[1:])) or (
        f"--port={port}" in cmd
    )


class ManagedProcess:
    """A Flower process we started: stopped by PID with its descendants, reaped, logged.

    Subclasses (server.superlink.SuperLinkProcess, clients.supernode.SuperNodeProcess)
    set ``proc``, ``tag`` and ``log_path`` when they start; ``what`` names the
    process in messages.
    """

    what = "process"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.stopped_pids: list[int] = []
        self.tag = new_tag()  # marks every process of this tree (see stop_process_tree)

    def stop(self, grace: float = 10.0) -> list[int]:
        """SIGTERM, then SIGKILL after ``grace`` s, to the process and its descendants."""
        if self.proc is None:
            return []
        self.stopped_pids = stop_process_tree(self.proc.pid, grace=grace, tag=self.tag)
        try:
            self.proc.wait(timeout=5)  # reap our direct child (no zombie)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None
        return self.stopped_pids

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.what} not running")
        return self.proc.pid

    @property
    def exited(self) -> int | None:
        """Exit code if the process has ended by itself, else None."""
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)
