"""A TLS + node-authentication deployment on 127.0.0.1, every process started here.

1. `silotune coordinator --pki-dir ... --enroll bank-a=bank-a.pub`: a SuperLink
   with TLS and `--enable-supernode-auth`, one tiny-llama round, min-nodes 1.
   Three agents then try to join:
   - bank-a, enrolled: takes part; the run completes and the report names it;
   - bank-x, valid TLS but its key was never enrolled: refused at activation,
     its agent exits with Flower's "Failed to activate SuperNode";
   - bank-p, `--insecure` (plain HTTP) against the TLS port: never connects,
     gives up after --max-wait-time.
   The refused ones are started first, so that had they been let in they
   would have been online when the job sampled its organizations.
2. Process level: `silotune pki enroll` / `pki revoke` against a running TLS
   SuperLink; a revoked node is disconnected, its key cannot come back, and
   a SuperNode trusting another CA is refused by TLS.

All processes are stopped by PID in finally blocks; afterwards no process
that ran in or on tmp_path survives.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from clients.silo.corpora import load_bbc_news
from clients.supernode import SuperNodeProcess
from runtime.flower_processes import alive, free_port, stop_process_tree
from runtime.keys import OrgKeyFiles, create_org_key
from server import pki
from server.enrollment import enrollments
from server.superlink import SuperLinkProcess

pytestmark = pytest.mark.slow

SILOTUNE = str(Path(sys.executable).with_name("silotune"))


def write_silo(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in rows))
    return path


def wait_for_text(path: Path, text: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in read_flat(path):
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in {path} after {timeout:.0f}s:\n"
                         f"{path.read_text(errors='replace')[-4000:] if path.exists() else ''}")


def read_flat(*paths: Path) -> str:
    """The files' text with whitespace collapsed (rich wraps long lines)."""
    return " ".join(" ".join(p.read_text(errors="replace").split()) for p in paths if p.exists())


def survivors(root: Path) -> list[str]:
    """Processes whose working directory or command line is under `root`."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            cwd = proc.info["cwd"] or ""
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if proc.pid != os.getpid() and (str(root) in cmd or cwd.startswith(str(root))):
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{proc.pid}: {cmd[:200]}")
    return found


def make_federation(tmp_path: Path, *orgs: str) -> tuple[Path, dict[str, OrgKeyFiles]]:
    pki_dir = tmp_path / "pki"
    pki.init_ca(pki_dir, days=2)
    pki.issue_server_cert(pki_dir, ["127.0.0.1"], days=1)
    keys = {org: create_org_key(tmp_path / f"{org}-keys", org) for org in orgs}
    return pki_dir, keys


def test_enrolled_agent_joins_unenrolled_and_plaintext_agents_are_refused(tmp_path: Path) -> None:
    pki_dir, keys = make_federation(tmp_path, "bank-a", "bank-x")
    corpus = load_bbc_news()
    silos = {name: write_silo(tmp_path / f"{name}.jsonl", corpus[i * 40:(i + 1) * 40])
             for i, name in enumerate(("bank-a", "bank-x", "bank-p"))}
    port = free_port()
    run_dir = tmp_path / "run"
    state_dir = tmp_path / "coord"
    settings = {"model": "tiny-llama", "job-id": "secure-deploy-test", "num-rounds": 1, "min-nodes": 1,
                "local-steps": 1, "max-length": 64, "eval-max-examples": 4, "round-timeout": 120,
                "node-wait-timeout": 90, "run-dir": str(run_dir)}
    coordinator_cmd = [SILOTUNE, "coordinator", "--pki-dir", str(pki_dir),
                       "--enroll", f"bank-a={keys['bank-a'].public_key}",
                       "--state-dir", str(state_dir), "--port", str(port), "--timeout", "240",
                       "--unsigned-app"]  # signed apps: tests/test_signed_app_deployment.py
    for key, value in settings.items():
        coordinator_cmd += ["--set", f"{key}={value}"]
    address = f"127.0.0.1:{port}"
    ca = str(pki_dir / "ca.pem")
    agent_cmds = {
        "bank-x": ["--ca-cert", ca, "--private-key", str(keys["bank-x"].private_key), "--unsigned-apps"],
        "bank-p": ["--insecure", "--max-wait-time", "20"],
        "bank-a": ["--ca-cert", ca, "--private-key", str(keys["bank-a"].private_key), "--unsigned-apps"],
    }
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("coordinator", *agent_cmds)}
    processes: dict[str, subprocess.Popen] = {}
    leftovers: list[int] = []
    try:
        processes["coordinator"] = subprocess.Popen(coordinator_cmd, stdout=logs["coordinator"],
                                                    stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        # bank-a is enrolled before the job is submitted: the line below comes after enrollment.
        wait_for_text(tmp_path / "coordinator.log", "(TLS, node auth)", 120, processes["coordinator"])
        assert "enrolled bank-a" in read_flat(tmp_path / "coordinator.log")
        for name, security in agent_cmds.items():  # the refused ones first
            processes[name] = subprocess.Popen(
                [SILOTUNE, "agent", "start", "--no-resident", "--coordinator", address, "--data", str(silos[name]), "--name", name,
                 "--state-dir", str(tmp_path / name), *security],
                stdout=logs[name], stderr=subprocess.STDOUT, env=env, cwd=tmp_path)

        code = processes["coordinator"].wait(timeout=300)
        assert code == 0, (tmp_path / "coordinator.log").read_text()[-4000:]
        # unenrolled: valid TLS, unknown key -> refused at activation, the agent exits
        assert processes["bank-x"].wait(timeout=120) == 2
        log_x = read_flat(tmp_path / "bank-x.log", tmp_path / "bank-x" / "supernode.log")
        assert "certificate verified" in log_x  # TLS itself was fine
        assert "Failed to activate SuperNode" in log_x, log_x[-3000:]
        # plaintext against TLS: never gets a connection, gives up
        assert processes["bank-p"].wait(timeout=120) == 2
        log_p = read_flat(tmp_path / "bank-p.log", tmp_path / "bank-p" / "supernode.log")
        assert "Failed to initialize the connection to the SuperLink" in log_p, log_p[-3000:]
        # the enrolled agent is still connected; it leaves on SIGTERM
        assert processes["bank-a"].poll() is None, (tmp_path / "bank-a.log").read_text()[-3000:]
        processes["bank-a"].send_signal(signal.SIGTERM)
        assert processes["bank-a"].wait(timeout=60) == 0, (tmp_path / "bank-a.log").read_text()[-3000:]
    finally:
        for process in processes.values():
            if process.poll() is None:
                leftovers += stop_process_tree(process.pid, grace=5)
        for handle in logs.values():
            handle.close()
    assert leftovers == [] and alive([p.pid for p in processes.values()]) == []
    assert survivors(tmp_path) == []

    report = json.loads((run_dir / "report.json").read_text())
    assert sorted(report["organizations"]) == ["bank-a"]
    assert [h["round"] for h in report["history"]] == [0, 1]
    assert report["history"][1]["accepted"] == ["bank-a"]
    assert "bank-x" not in json.dumps(report) and "bank-p" not in json.dumps(report)
    (row,) = enrollments(state_dir)
    assert row.name == "bank-a" and row.fingerprint == keys["bank-a"].fingerprint
    assert "warning: --insecure" not in read_flat(tmp_path / "coordinator.log")
    assert "warning: --insecure" in read_flat(tmp_path / "bank-p.log")


def test_pki_enroll_and_revoke_against_a_running_superlink(tmp_path: Path) -> None:
    pki_dir, keys = make_federation(tmp_path, "bank-a")
    other_ca = pki.init_ca(tmp_path / "other-pki", days=1)
    state_dir = tmp_path / "coord"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def silotune(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SILOTUNE, *args], capture_output=True, text=True, env=env,
                              timeout=180, check=False)

    superlink = SuperLinkProcess()
    node_a, node_wrong_ca = SuperNodeProcess(), SuperNodeProcess()
    pids: list[int] = []
    try:
        superlink.start(state_dir, insecure=False, tls=pki.coordinator_files(pki_dir, ["127.0.0.1"]),
                        node_auth=True)
        pids.append(superlink.pid)
        result = silotune("pki", "enroll", "--coordinator-dir", str(state_dir), "--name", "bank-a",
                          "--public-key", str(keys["bank-a"].public_key))
        assert result.returncode == 0, result.stderr
        (row,) = enrollments(state_dir)
        assert f"node {row.node_id}" in result.stdout
        node_a.start(superlink.address, None, tmp_path / "bank-a", insecure=False,
                     root_certificates=pki_dir / "ca.pem", auth_private_key=keys["bank-a"].private_key)
        node_wrong_ca.start(superlink.address, None, tmp_path / "wrong-ca", insecure=False,
                            root_certificates=other_ca.cert, auth_private_key=keys["bank-a"].private_key,
                            max_wait_time=60)
        pids += [node_a.pid, node_wrong_ca.pid]
        (online,) = superlink.wait_for_nodes(1, timeout=120)
        assert int(online["node-id"]) == row.node_id

        deadline = time.monotonic() + 90
        while node_wrong_ca.exited is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert node_wrong_ca.exited not in (None, 0), node_wrong_ca.log_tail()
        assert "SSL/TLS handshake error" in node_wrong_ca.log_tail(200)

        result = silotune("pki", "revoke", "--coordinator-dir", str(state_dir), "--name", "bank-a")
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 120  # refused at its next heartbeat, then it shuts down
        while node_a.exited is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert node_a.exited is not None, node_a.log_tail()
        assert not [n for n in superlink.list_nodes() if n["status"] == "online"]
        result = silotune("pki", "enroll", "--coordinator-dir", str(state_dir), "--name", "bank-a",
                          "--public-key", str(keys["bank-a"].public_key))
        assert result.returncode == 2 and "stays revoked" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        for process in (node_a, node_wrong_ca, superlink):
            pids += process.stop(grace=5)
    assert alive(pids) == []
    assert survivors(tmp_path) == []
