"""The fault-injection suite's harness.

Every test under tests/faults/ is marked ``faults``; the multi-minute ones
are also marked ``faults_long`` (and ``slow``): `make test` leaves those out,
`make faults` runs everything here.

``Deployment`` starts a coordinator and agents through the `silotune` CLI on
127.0.0.1, as separate processes, and injects faults into them: SIGKILL of a
whole process tree (a machine that dies), a stalled uplink (netfault.py), or
a fault point armed inside the coordinator
(SILOTUNE_FAULT_POINT, server/fault_points.py). Every process started here
carries a fresh tag in its environment, so at the end every one of them —
including the SuperLink, SuperExec, ServerApp and ClientApp processes that
Flower started and that a killed parent left orphaned — is found and stopped
by PID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from runtime.flower_processes import LOCALHOST, free_port, stop_process_tree

SILOTUNE = str(Path(sys.executable).with_name("silotune"))
TAG = "SILOTUNE_FAULTS_TAG"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.faults)
            if item.get_closest_marker("faults_long"):
                item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _warm_imports() -> None:
    """Import what a coordinator needs once, so forked coordinators start at once."""
    from runtime import base_model
    import server.job  # noqa: F401

    base_model.model_config("tiny-llama")
    base_model.fingerprint("tiny-llama")


def tagged_processes(tag: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(TAG) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def signal_tree(pid: int, sig: int) -> list[int]:
    """Send ``sig`` to a process and all its descendants, snapshotted first, all at once."""
    tree = process_tree(pid)
    for proc in tree:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    if sig == signal.SIGKILL:
        psutil.wait_procs(tree, timeout=10)
    return [p.pid for p in tree]


def write_silo(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in rows))
    return path


class Deployment:
    """A coordinator and agents on 127.0.0.1, started via the CLI; see the module docstring."""

    def __init__(self, root: Path, settings: dict[str, Any], agents: list[str], rows_per_agent: int = 40) -> None:
        from clients.silo.corpora import load_bbc_news

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.state_dir = root / "coordinator"
        self.run_dir = root / "run"
        self.settings = {"model": "tiny-llama", "run-dir": str(self.run_dir), **settings}
        self.tag = uuid.uuid4().hex
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", TAG: self.tag}
        corpus = load_bbc_news()
        step = max(1, len(corpus) // (len(agents) + 1))
        self.silos = {name: write_silo(root / f"{name}.jsonl", corpus[i * step: i * step + rows_per_agent])
                      for i, name in enumerate(agents)}
        self.coordinators: list[subprocess.Popen] = []
        self.agents: dict[str, subprocess.Popen] = {}
        self.started: list[int] = []
        self.marks = root / "faults.mark"
        self._logs: list[Any] = []

    # -- starting --
    def _popen(self, cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        handle = open(log, "a")
        self._logs.append(handle)
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                stdin=subprocess.DEVNULL)
        self.started.append(proc.pid)
        return proc

    def start_coordinator(self, fault: str | None = None, timeout: float = 1500) -> subprocess.Popen:
        cmd = [SILOTUNE, "coordinator", "--insecure", "--state-dir", str(self.state_dir),
               "--port", str(self.port), "--timeout", str(timeout)]
        for key, value in self.settings.items():
            cmd += ["--set", f"{key}={value}"]
        env = dict(self.env)
        if fault:
            env["SILOTUNE_FAULT_POINT"] = fault
            env["SILOTUNE_FAULT_MARK"] = str(self.marks)
        proc = self._popen(cmd, self.root / f"coordinator-{len(self.coordinators)}.log", env)
        self.coordinators.append(proc)
        return proc

    def start_agent(self, name: str, resident: bool = False, via_port: int | None = None) -> subprocess.Popen:
        """`silotune agent start`; without the resident trainer (Ray) unless asked: one Ray
        instance per agent does not fit this suite's 2-core budget. ``via_port``: connect
        through a proxy on that port (netfault.HttpHoldProxy) instead of directly."""
        cmd = [SILOTUNE, "agent", "start", "--insecure", "--coordinator", f"{LOCALHOST}:{via_port or self.port}",
               "--data", str(self.silos[name]), "--name", name, "--state-dir", str(self.root / f"agent-{name}"),
               *([] if resident else ["--no-resident"])]
        proc = self._popen(cmd, self.root / f"agent-{name}.log", self.env)
        self.agents[name] = proc
        return proc

    def start_agents(self, *names: str) -> None:
        for name in names or self.silos:
            self.start_agent(name)

    # -- faults --
    def kill_coordinator(self) -> list[int]:
        """SIGKILL the whole coordinator (CLI, SuperLink, SuperExec, ServerApp) at once."""
        pids = signal_tree(self.coordinators[-1].pid, signal.SIGKILL)
        self.coordinators[-1].wait(timeout=10)
        return pids

    def kill_agent(self, name: str) -> list[int]:
        pids = signal_tree(self.agents[name].pid, signal.SIGKILL)
        self.agents[name].wait(timeout=10)
        return pids

    def clientapps(self, name: str) -> list[psutil.Process]:
        """The agent's running ClientApp processes (one per instruction being handled)."""
        return [p for p in process_tree(self.agents[name].pid)
                if any("flwr-clientapp" in part for part in _cmdline(p))]

    def serverapps(self) -> list[psutil.Process]:
        return [p for p in tagged_processes(self.tag) if any("flwr-serverapp" in part for part in _cmdline(p))]

    # -- observing --
    def superlink_log(self) -> str:
        path = self.state_dir / "superlink.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def marks_seen(self) -> list[list[str]]:
        return [line.split() for line in self.marks.read_text().splitlines()] if self.marks.exists() else []

    def wait_for_mark(self, count: int, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = self.marks_seen()
            if len(seen) >= count:
                return seen[count - 1]
            if self.coordinators[-1].poll() is not None:
                raise AssertionError(f"the coordinator exited ({self.coordinators[-1].returncode}) "
                                     f"before the fault point:\n{self.tail()}")
            time.sleep(0.2)
        raise AssertionError(f"fault point not reached in {timeout}s:\n{self.tail()}")

    def wait_for_log(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str]:
        """Wait until the SuperLink/ServerApp log matches ``pattern`` after offset ``start``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.superlink_log()[start:])
            if found:
                return found
            if self.coordinators and self.coordinators[-1].poll() is not None:
                raise AssertionError(f"coordinator exited before /{pattern}/:\n{self.tail()}")
            time.sleep(0.2)
        raise AssertionError(f"/{pattern}/ not in the log after {timeout}s:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        logs = sorted(self.root.glob("coordinator-*.log"))
        text = logs[-1].read_text(errors="replace") if logs else ""
        return f"--- {logs[-1] if logs else ''}\n{text[-chars:]}\n--- superlink.log\n{self.superlink_log()[-chars:]}"

    def rounds_on_disk(self) -> list[int]:
        """Rounds whose checkpoint directory exists (it appears by one atomic rename)."""
        root = self.run_dir / "checkpoints"
        names = os.listdir(root) if root.is_dir() else []
        return sorted(int(n[len("round-"):]) for n in names if re.fullmatch(r"round-\d{5,}", n))

    def wait_for_round(self, server_round: int, timeout: float) -> float:
        """Wait until round ``server_round`` is checkpointed; return the wall-clock time it was seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server_round in self.rounds_on_disk():
                return time.time()
            if self.coordinators[-1].poll() is not None:
                raise AssertionError(f"the coordinator exited ({self.coordinators[-1].returncode}) before "
                                     f"round {server_round} was checkpointed:\n{self.tail()}")
            time.sleep(0.2)
        raise AssertionError(f"round {server_round} not checkpointed after {timeout}s:\n{self.tail()}")

    def run_log(self) -> str:
        """The ServerApp's log of the last finished run (written by the coordinator CLI)."""
        logs = sorted(self.state_dir.glob("run-*.log"), key=lambda p: p.stat().st_mtime)
        return logs[-1].read_text(errors="replace") if logs else ""

    def report(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "report.json").read_text())

    # -- stopping --
    def stop(self) -> list[int]:
        """Stop every process started here, and everything they started, by PID. Return survivors."""
        for name, proc in self.agents.items():
            if proc.poll() is None:
                signal_tree(proc.pid, signal.SIGCONT)  # a stopped (SIGSTOPped) process cannot exit
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.agents.values(), *self.coordinators]:
            if proc.poll() is None:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    stop_process_tree(proc.pid, grace=5)
        for proc in tagged_processes(self.tag):  # orphans of killed parents
            stop_process_tree(proc.pid, grace=5)
        for handle in self._logs:
            handle.close()
        return [p.pid for p in tagged_processes(self.tag)]


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Any]:
    """A factory: deployment(settings, agents) → Deployment; all stopped afterwards."""
    made: list[Deployment] = []

    def make(settings: dict[str, Any], agents: list[str], **kwargs: Any) -> Deployment:
        made.append(Deployment(tmp_path / f"d{len(made)}", settings, agents, **kwargs))
        return made[-1]

    yield make
    survivors = [pid for d in made for pid in d.stop()]
    assert survivors == [], f"processes left running: {survivors}"
