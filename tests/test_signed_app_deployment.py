"""Only the federation's signed app runs inside an organization (issue 11): a real deployment.

A SuperLink and one `silotune agent start --app-publisher-key publisher.pub` (its SuperNode in
`--isolation process` + clients/app_launcher.py), as processes on 127.0.0.1. The repository, copied
and signed, is the app. First a copy whose clients/app.py was changed after signing — it reads the
silo file as soon as it is imported — is submitted: the agent answers with an error reply naming the
file, installs nothing, and the silo file is never opened (the kernel says so: inotify on the file,
from this process). Then the signed app runs a 1-round tiny job to completion, and the same watch
sees its ClientApp open the silo: the check could have failed. Every process is stopped by PID.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from clients.silo.corpora import load_bbc_news
from runtime.app_signature import SIGNATURE_FILE, PublisherKeyFiles, build_fab, create_publisher_key, sign_app
from runtime.flower_processes import alive, stop_process_tree
from server.superlink import SuperLinkProcess

pytestmark = pytest.mark.slow

SILOTUNE = str(Path(sys.executable).with_name("silotune"))
REPO = Path(__file__).resolve().parent.parent
IN_ACCESS, IN_OPEN = 0x1, 0x20


class FileOpens:
    """Kernel notifications (inotify) of every open/read of one file, by any process."""

    def __init__(self, path: Path) -> None:
        self.libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        assert self.libc.inotify_add_watch(self.fd, os.fsencode(path), IN_OPEN | IN_ACCESS) >= 0
        self.events: list[int] = []

    def drain(self) -> list[int]:
        """The event masks that arrived since the last call."""
        new: list[int] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                _, mask, _, length = struct.unpack_from("iIII", data, offset)
                new.append(mask)
                offset += 16 + length
        self.events += new
        return new

    def close(self) -> None:
        os.close(self.fd)


def copy_app(dst: Path) -> Path:
    """This checkout as an app folder (what `flwr run .` would bundle), without the environment."""
    shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis", "pki",
        "silotune-app.sig.json"))
    return dst


@dataclass
class SignedApps:
    """A publisher key, this checkout signed with it, a silo, and a copy of the signed app whose
    clients/app.py was changed after signing: it reads the silo as soon as it is imported."""

    keys: PublisherKeyFiles
    app: Path
    tampered: Path
    silo: Path


def signed_and_tampered_apps(tmp_path: Path) -> SignedApps:
    keys = create_publisher_key(tmp_path / "pki")
    app = copy_app(tmp_path / "signed" / "silotune")
    sign_app(app, keys.private_key)
    silo = tmp_path / "org-a.jsonl"
    silo.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in load_bbc_news()[:30]))
    tampered = shutil.copytree(app, tmp_path / "tampered" / "silotune")
    code = tampered / "clients" / "app.py"
    code.write_text(code.read_text() + f"\nLEAK = open({str(silo)!r}, 'rb').read()  # exfiltrate\n")
    return SignedApps(keys, app, tampered, silo)


#: a 1-round job on the tiny model, the one both deployments run
TINY_JOB = {"model": "tiny-llama", "num-rounds": 1, "min-nodes": 1, "local-steps": 1, "max-length": 64,
            "eval-max-examples": 4, "node-wait-timeout": 60}


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {what}:\n{log.read_text()[-4000:] if log else ''}")
        time.sleep(0.5)
    raise AssertionError(f"no {what} after {timeout:.0f}s:\n{log.read_text()[-4000:] if log else ''}")


def test_agent_refuses_a_modified_app_without_opening_the_silo_and_runs_the_signed_one(tmp_path: Path) -> None:
    t0 = time.monotonic()
    apps = signed_and_tampered_apps(tmp_path)
    keys, app, tampered, silo = apps.keys, apps.app, apps.tampered, apps.silo
    settings = {**TINY_JOB, "round-timeout": 90}
    link = SuperLinkProcess()
    agent_log = tmp_path / "agent.log"
    agent: subprocess.Popen | None = None
    watch: FileOpens | None = None
    pids: list[int] = []
    try:
        link.start(tmp_path / "link")
        pids.append(link.pid)
        with open(agent_log, "w") as log:
            agent = subprocess.Popen(
                [SILOTUNE, "agent", "start", "--insecure", "--no-resident", "--coordinator", link.fleet_address,
                 "--data", str(silo), "--name", "org-a", "--state-dir", str(tmp_path / "agent"),
                 "--app-publisher-key", str(keys.public_key)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=tmp_path)
        pids.append(agent.pid)
        wait_for(lambda: "SuperNode pid" in agent_log.read_text(), 120, "agent start", agent, agent_log)
        link.wait_for_nodes(1, timeout=60)
        assert f"only apps signed by publisher key {keys.fingerprint} run here" in agent_log.read_text()
        watch = FileOpens(silo)  # from here on: the agent itself validated the silo at start, before this

        # 1. the modified app: refused by name, never installed, never imported, the silo never opened
        run_id = link.submit_run(tampered, {**settings, "job-id": "tampered", "run-dir": str(tmp_path / "run-t")})
        status = link.wait_for_run(run_id, timeout=240, poll=1.0)
        assert status != "finished:completed"
        supernode_log = (tmp_path / "agent" / "supernode.log").read_text()
        assert "app refused: file clients/app.py modified" in supernode_log, supernode_log[-4000:]
        assert "app refused: file clients/app.py modified" in link.run_logs(run_id)  # the coordinator's side
        assert watch.drain() == [], "the silo file was opened while the modified app was handled"
        installed = tmp_path / "agent" / "flwr-home" / "silotune-apps"
        assert not installed.exists() or list(installed.iterdir()) == []
        assert not (tmp_path / "agent" / "flwr-home" / "apps").exists()  # nor by Flower's own installer
        t_refused = time.monotonic() - t0

        # 2. the signed app: runs to completion, and the watch sees its ClientApp read the silo
        run_id = link.submit_run(app, {**settings, "job-id": "signed", "run-dir": str(tmp_path / "run-s")})
        status = link.wait_for_run(run_id, timeout=300, poll=1.0)
        assert status == "finished:completed", link.run_logs(run_id)[-4000:]
        report = json.loads((tmp_path / "run-s" / "report.json").read_text())
        assert [h["round"] for h in report["history"]] == [0, 1]
        assert report["history"][1]["accepted"] == ["org-a"]
        assert any(mask & IN_OPEN for mask in watch.drain()), "the watch never saw the ClientApp open the silo"
        # installed under the full hash of exactly the bundle `flwr run` built from the signed folder
        digest = hashlib.sha256(build_fab(app)).hexdigest()
        assert [p.name for p in installed.iterdir()] == [digest]
        supernode_log = (tmp_path / "agent" / "supernode.log").read_text()
        signed_files = json.loads((app / SIGNATURE_FILE).read_text())["files"]
        assert f"verified: {len(signed_files)} files signed by publisher key {keys.fingerprint}" in supernode_log
        # the ClientApp's modules (clients, runtime, protos, ...) came from that folder, not the agent's silotune
        assert f"ClientApp loaded from {installed / digest}/apps/silotune.silotune.0.1.0." in supernode_log

        agent.send_signal(signal.SIGTERM)  # the agent leaves and stops its SuperNode and launcher
        assert agent.wait(timeout=60) == 0, agent_log.read_text()[-3000:]
    finally:
        if watch is not None:
            watch.close()
        leftovers = []
        if agent is not None and agent.poll() is None:
            leftovers = stop_process_tree(agent.pid, grace=5)
        link.stop()
    assert leftovers == [] and alive(pids) == []
    print(f"refused after {t_refused:.0f}s, signed run done after {time.monotonic() - t0:.0f}s")
