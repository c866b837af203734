"""CPU a `silotune coordinator` uses while it waits for its agents, and during rounds (issue 14: no
idle polling; target under 2% of one core while waiting).

Waiting (the default): starts `silotune coordinator --insecure` with a tiny job and no agent, lets
it wait for ``--seconds``, and reports the CPU time of its whole process tree over that window:
the coordinator, the SuperLink and gateway it started, the SuperExec, a ServerApp process if one
is running, and every short-lived process (a `flwr` call) they ran and reaped.

Rounds (``--rounds N``): the same coordinator with ``min-nodes=2`` and two `silotune agent start
--insecure --no-resident` processes on the tiny model; the coordinator's tree is measured from its
run's first event (round 0, the base model's evaluation, is written) until its SuperLink stops,
N rounds later (its shutdown is not counted). The agents' own CPU is not part of it.

Run against another checkout with ``--checkout DIR`` (e.g. `git archive HEAD | tar -x -C DIR`) to
compare in the same session:

    python benchmarks/idle_coordinator.py --seconds 60
    python benchmarks/idle_coordinator.py --checkout /tmp/before --seconds 60
    python benchmarks/idle_coordinator.py --rounds 2

Prints one line per run, CPU seconds and the share of one core, then each process's own CPU
seconds by role ("reaped": processes that ended within the window, e.g. a `flwr` call).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.flower_processes import SUPERLINK_COMMANDS, free_port, stop_process_tree  # noqa: E402

#: a process's role in the tree, from the first of these its command line names
ROLES = ("flower-superlink", "flower-superexec", "flwr-serverapp", "server.gateway", "flwr")
WAITING = "waiting for"   # both the old and the new coordinator print it once the SuperLink is up


def role(proc: psutil.Process, root: psutil.Process) -> str:
    if proc.pid == root.pid:
        return "coordinator"
    words = " ".join(proc.cmdline())
    if any(command in words for command in SUPERLINK_COMMANDS):
        return "flower-superlink"  # Flower's script, or the paced entry point in front of it
    return next((name for name in ROLES if name in words), words[:40])


class Sample:
    """One look at the tree: the total CPU seconds of ``root`` and its live descendants, including the
    children each reaped, and each live process's own CPU seconds (pid → role, seconds)."""

    def __init__(self, root: psutil.Process) -> None:
        self.total = 0.0
        self.own: dict[int, tuple[str, float]] = {}
        for proc in [root, *root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                self.own[proc.pid] = (role(proc, root), times.user + times.system)
            except psutil.NoSuchProcess:
                continue
            self.total += times.user + times.system + times.children_user + times.children_system


def window(first: Sample, last: Sample) -> tuple[float, Counter[str]]:
    """CPU seconds between two samples: the tree's, and by role each process's own (a process that
    ended between the samples counts in the total, through its parent, and under "reaped")."""
    by_role: Counter[str] = Counter()
    for pid, (name, seconds) in last.own.items():
        by_role[name] += seconds - first.own.get(pid, (name, 0.0))[1]
    total = last.total - first.total
    by_role["reaped"] = total - sum(by_role.values())
    return total, by_role


def launcher(checkout: Path) -> list[str]:
    """`silotune` from ``checkout`` (its source first on sys.path)."""
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(checkout)!r}); "
            "from simulations.cli.main import main; sys.exit(main())"]


def start_coordinator(checkout: Path, state: Path, port: int, settings: dict[str, object],
                      timeout: float) -> subprocess.Popen:
    cmd = [*launcher(checkout), "coordinator", "--insecure", "--state-dir", str(state / "coord"),
           "--port", str(port), "--timeout", str(timeout), "--app-dir", str(checkout)]
    for key, value in {"model": "tiny-llama", "run-dir": str(state / "run"), **settings}.items():
        cmd += ["--set", f"{key}={value}"]
    log = open(state / "coordinator.log", "w")
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=state,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        log.close()   # the child holds its own copy


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no {what} (coordinator {'exited' if proc.poll() is not None else 'running'}); "
                               f"see {log}")
        time.sleep(0.2)


def measure_waiting(checkout: Path, seconds: float, settle: float) -> tuple[float, Counter[str], float]:
    state = Path(tempfile.mkdtemp(prefix="idle-coordinator-"))
    log = state / "coordinator.log"
    settings = {"min-nodes": 3, "node-wait-timeout": seconds + settle + 120}
    proc = start_coordinator(checkout, state, free_port(), settings, seconds + settle + 180)
    try:
        wait_for(lambda: WAITING in log.read_text(), 180, "wait for agents", proc, log)
        time.sleep(settle)  # the gateway, the SuperExec (and, before, the ServerApp) start; the job waits
        root = psutil.Process(proc.pid)
        first, started = Sample(root), time.monotonic()
        time.sleep(seconds)
        last, wall = Sample(root), time.monotonic() - started
        if proc.poll() is not None:
            raise RuntimeError(f"the coordinator exited {proc.returncode} while it should wait; see {log}")
    finally:
        stop_process_tree(proc.pid, grace=5)
    return (*window(first, last), wall)


def write_silo(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in rows))
    return path


def measure_rounds(checkout: Path, rounds: int) -> tuple[float, Counter[str], float]:
    from clients.silo.corpora import load_bbc_news

    state = Path(tempfile.mkdtemp(prefix="round-coordinator-"))
    log, events, port = state / "coordinator.log", state / "run" / "events.jsonl", free_port()
    settings = {"min-nodes": 2, "num-rounds": rounds, "local-steps": 1, "max-length": 64, "eval-max-examples": 4,
                "round-timeout": 300, "node-wait-timeout": 300}
    proc = start_coordinator(checkout, state, port, settings, 1200)
    agents: list[subprocess.Popen] = []
    news = load_bbc_news()
    try:
        wait_for(lambda: WAITING in log.read_text(), 180, "wait for agents", proc, log)
        for i in range(2):
            silo = write_silo(state / f"org-{i}.jsonl", news[i * 40:(i + 1) * 40])
            with open(state / f"org-{i}.log", "w") as out:
                agents.append(subprocess.Popen(
                    [*launcher(checkout), "agent", "start", "--insecure", "--no-resident", "--coordinator",
                     f"127.0.0.1:{port}", "--data", str(silo), "--name", f"org-{i}", "--state-dir",
                     str(state / f"agent-{i}")], stdout=out, stderr=subprocess.STDOUT, cwd=state))
        root = psutil.Process(proc.pid)
        wait_for(lambda: events.exists() and events.stat().st_size > 0, 600, "first round event", proc, log)
        first, started = Sample(root), time.monotonic()
        last, ended = first, started
        while proc.poll() is None:   # the window ends with the SuperLink: then the coordinator stops the rest
            try:
                now = Sample(root)
            except psutil.NoSuchProcess:
                break
            if "flower-superlink" not in {name for name, _ in now.own.values()}:
                break
            last, ended = now, time.monotonic()
            time.sleep(0.5)
        wall = ended - started
        if proc.wait(timeout=300) != 0:
            raise RuntimeError(f"coordinator exited {proc.returncode}; see {log}")
    finally:
        for p in [proc, *agents]:
            stop_process_tree(p.pid, grace=5)
    return (*window(first, last), wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the silotune source tree to run")
    parser.add_argument("--seconds", type=float, default=60.0, help="the measured window while waiting")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds to let everything start first")
    parser.add_argument("--rounds", type=int, help="measure a job of this many rounds with two agents instead")
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    if args.rounds:
        total, used, wall = measure_rounds(checkout, args.rounds)
        what = f"during {args.rounds} round(s) with 2 agents"
    else:
        total, used, wall = measure_waiting(checkout, args.seconds, args.settle)
        what = "waiting for agents"
    print(f"{args.checkout}: {total:.2f} CPU s over {wall:.0f} s {what} = {100 * total / wall:.1f}% of one core "
          f"(load average {os.getloadavg()[0]:.2f})")
    print("  " + ", ".join(f"{name} {cpu:.2f} s" for name, cpu in used.most_common() if cpu >= 0.005))


if __name__ == "__main__":
    main()
