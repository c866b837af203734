"""CPU a `silotune coordinator` uses while it waits for its agents (issue 14: no idle polling).

Starts `silotune coordinator --insecure` with a tiny job and no agent, lets it wait for
``--seconds``, and reports the CPU time of its whole process tree over that window: the
coordinator, the SuperLink and gateway it started, the ServerApp process, and every
short-lived process (a `flwr ls` per poll) they ran and reaped. Run it against another
checkout with ``--checkout DIR`` (e.g. a `git worktree` of an older commit) to compare in
the same session:

    python benchmarks/idle_coordinator.py --seconds 60
    git worktree add /tmp/before <commit> && python benchmarks/idle_coordinator.py --checkout /tmp/before

Prints one line per run: CPU seconds and the share of one core.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.flower_processes import free_port, stop_process_tree  # noqa: E402


def tree_cpu(root: psutil.Process) -> float:
    """CPU seconds of ``root`` and all its live descendants, including the children each reaped."""
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def measure(checkout: Path, seconds: float, settle: float) -> tuple[float, float]:
    state = Path(tempfile.mkdtemp(prefix="idle-coordinator-"))
    launcher = (f"import sys; sys.path.insert(0, {str(checkout)!r}); "
                "from simulations.cli.main import main; sys.exit(main())")
    cmd = [sys.executable, "-c", launcher, "coordinator", "--insecure", "--state-dir", str(state / "coord"),
           "--port", str(free_port()), "--timeout", str(seconds + settle + 120), "--app-dir", str(checkout),
           "--set", "model=tiny-llama", "--set", "min-nodes=3", "--set", f"node-wait-timeout={seconds + settle + 60}",
           "--set", f"run-dir={state / 'run'}"]
    log = open(state / "coordinator.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=state,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        time.sleep(settle)  # SuperLink, gateway and the ServerApp start; the job waits for agents
        root = psutil.Process(proc.pid)
        before, started = tree_cpu(root), time.monotonic()
        time.sleep(seconds)
        used, wall = tree_cpu(root) - before, time.monotonic() - started
    finally:
        stop_process_tree(proc.pid, grace=5)
        log.close()
    if "waiting for 3 organization(s)" not in (state / "coordinator.log").read_text():
        raise RuntimeError(f"the coordinator did not reach its wait; see {state / 'coordinator.log'}")
    return used, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the silotune source tree to run")
    parser.add_argument("--seconds", type=float, default=60.0, help="the measured window")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds to let everything start first")
    args = parser.parse_args()
    used, wall = measure(args.checkout.resolve(), args.seconds, args.settle)
    print(f"{args.checkout}: {used:.2f} CPU s over {wall:.0f} s waiting for agents = {100 * used / wall:.1f}% of one core")


if __name__ == "__main__":
    main()
