"""A warm app runner in a real deployment (clients/app_launcher.py `--warm-runner`): a SuperLink and
one agent (in this process; its SuperNode paced by clients/supernode.py, its launcher keeping one
runner per app) on 127.0.0.1. The repository, copied and signed, is the app. A copy modified after
signing is refused by name in its own runner, which installs nothing, never opens the silo and
leaves; then the signed app runs a 1-round tiny job, every task of it in one runner process that
verified and loaded the app once. The model loads in the runner (no resident trainer here: no Ray).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest

from clients.agent import Agent
from runtime.app_signature import SIGNATURE_FILE, build_fab
from runtime.flower_processes import alive
from server.superlink import SuperLinkProcess
from test_signed_app_deployment import TINY_JOB, FileOpens, signed_and_tampered_apps

pytestmark = pytest.mark.slow


def test_one_warm_runner_per_app_refuses_a_modified_app_and_serves_every_task_of_the_signed_one(
        tmp_path: Path) -> None:
    apps = signed_and_tampered_apps(tmp_path)
    keys, app, tampered, silo = apps.keys, apps.app, apps.tampered, apps.silo
    digest = hashlib.sha256(build_fab(app)).hexdigest()
    settings = {**TINY_JOB, "round-timeout": 120}
    link = SuperLinkProcess()
    agent = Agent(str(silo), "", name="org-a", state_dir=tmp_path / "agent", resident=False,
                  supernode_options={"insecure": True, "app_publisher_key": keys.public_key, "warm_runner": True})
    watch: FileOpens | None = None
    pids: list[int] = []
    try:
        link.start(tmp_path / "link")
        agent.coordinator = link.fleet_address
        agent.start()
        assert agent.supernode is not None and agent.supernode.launcher is not None
        pids += [link.pid, agent.supernode.pid, agent.supernode.launcher.pid]
        link.wait_for_nodes(1, timeout=60)
        watch = FileOpens(silo)
        log_path = tmp_path / "agent" / "supernode.log"

        # 1. the modified app: its runner refuses it, installs nothing, never opens the silo, and leaves
        run_id = link.submit_run(tampered, {**settings, "job-id": "tampered", "run-dir": str(tmp_path / "run-t")})
        assert link.wait_for_run(run_id, timeout=240, poll=1.0) != "finished:completed"
        log = log_path.read_text()
        assert "app refused: file clients/app.py modified" in log, log[-4000:]
        assert re.search(r"app runner \d+: leaves, its app refused", log), log[-4000:]
        assert watch.drain() == [], "the silo file was opened while the modified app was handled"
        installed = tmp_path / "agent" / "flwr-home" / "silotune-apps"
        assert not installed.exists() or list(installed.iterdir()) == []

        # 2. the signed app: every task in one runner, the app verified and loaded once
        run_id = link.submit_run(app, {**settings, "job-id": "signed", "run-dir": str(tmp_path / "run-s")})
        status = link.wait_for_run(run_id, timeout=300, poll=1.0)
        assert status == "finished:completed", link.run_logs(run_id)[-4000:]
        report = json.loads((tmp_path / "run-s" / "report.json").read_text())
        assert report["history"][1]["accepted"] == ["org-a"]
        assert any(watch.drain()), "the watch never saw the runner open the silo"
        log = log_path.read_text()
        runners = set(re.findall(rf"app runner (\d+): serves app sha256 {digest}", log))
        assert len(runners) == 1, log[-4000:]
        runner = runners.pop()
        done = re.findall(rf"app runner {runner}: task (\d+) done \(exit code 0\)", log)
        assert len(done) >= 2, log[-4000:]  # round 0's evaluation, then round 1's training and evaluation
        assert log.count("verified: ") == 1 and log.count(f"ClientApp loaded from {installed / digest}") == 1
        assert [p.name for p in installed.iterdir()] == [digest]
        assert "SuperNode pacing: pull every 0.5 s when idle" in log
        assert "app launcher: a warm runner per app, task poll every 0.10 s" in log
        pids.append(int(runner))
        signed_files = json.loads((app / SIGNATURE_FILE).read_text())["files"]
        assert f"verified: {len(signed_files)} files signed by publisher key {keys.fingerprint}" in log
    finally:
        if watch is not None:
            watch.close()
        agent.stop()
        link.stop()
    deadline = time.monotonic() + 10
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive(pids) == []
