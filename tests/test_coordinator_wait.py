"""`silotune coordinator`, and a job of `coordinator --serve`, submit the job's run only once
min-nodes agents are online (issue 14: a coordinator waiting for its agents stays under 2% of a
core; benchmarks/idle_coordinator.py).

The SuperLink is a fake here: what is checked is the order of the calls, and that a job whose
agents never come still ends with the job's own QuorumError after node-wait-timeout. The real
SuperLink's ``online_node_ids`` is checked in tests/test_flower_processes.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import server.cli.coordinator as coordinator_cli
from server.service.manager import JobManager, Submission
from server.service.store import CANCELLED, FAILED, RUNNING
from server.superlink import SuperLinkProcess
from simulations.cli.main import main


class FakeSuperLink:
    """``online_node_ids`` and ``submit_run``, recorded in ``calls``; ``online`` answers one ask
    each, the last repeats."""

    run_id = 5

    def __init__(self, online: list[list[int]]) -> None:
        self.online = online
        self.calls: list[str] = []

    def online_node_ids(self) -> list[int]:
        self.calls.append("online")
        return self.online.pop(0) if len(self.online) > 1 else self.online[0]

    def submit_run(self, app_dir: Path, run_config: dict) -> int:
        self.calls.append("submit")
        return self.run_id


class FakeLink(FakeSuperLink):
    """What `coordinator` asks of a SuperLinkProcess."""

    def __init__(self, online: list[list[int]], status: str = "finished:failed") -> None:
        super().__init__(online)
        self.status = status

    def follow_run_log(self, run_id: int, on_line: Any) -> Any:
        self.calls.append("follow")
        return self

    def stop(self) -> None:
        self.calls.append("stop-follow")

    def wait_for_run(self, run_id: int, timeout: float) -> str:
        self.calls.append("wait")
        return self.status

    def run_logs(self, run_id: int) -> str:
        return "the run's log"


def run_coordinator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, link: FakeLink, **settings: object) -> int:
    monkeypatch.setattr(coordinator_cli, "start_plane", lambda *args: link)
    argv = ["coordinator", "--insecure", "--state-dir", str(tmp_path / "coord")]
    for key, value in {"model": "tiny-llama", "run-dir": str(tmp_path / "run"), **settings}.items():
        argv += ["--set", f"{key}={value}"]
    return main(argv)


def test_no_run_is_submitted_until_min_nodes_agents_are_online(monkeypatch, tmp_path):
    link = FakeLink([[], [11], [11, 12]])
    code = run_coordinator(monkeypatch, tmp_path, link, **{"min-nodes": 2, "node-wait-timeout": 60})
    assert code == 2   # the fake run ends failed
    assert link.calls[:4] == ["online", "online", "online", "submit"]
    assert link.calls[4:] == ["follow", "wait", "stop-follow"]


def test_agents_that_never_come_end_the_job_with_its_quorum_error_and_no_run(monkeypatch, tmp_path, capsys):
    link = FakeLink([[7]])
    code = run_coordinator(monkeypatch, tmp_path, link, **{"min-nodes": 2, "node-wait-timeout": 1})
    assert code == 2
    err = capsys.readouterr().err
    assert "QuorumError: only 1 organization(s) online after 1s; min-nodes=2" in err, err
    assert "submit" not in link.calls and len(link.calls) >= 2   # asked again before giving up


def _finished_checkpoints(run_dir: Path, rounds: int) -> None:
    """A valid checkpoint of the job's last round, as a job that finished leaves it."""
    import numpy as np

    from protos.adapter import LoraSpec
    from server.checkpoint import CheckpointStore, last_valid_round

    CheckpointStore(run_dir / "checkpoints").save(rounds, {"w": np.ones((2, 2), np.float32)}, LoraSpec(),
                                                  "tiny-llama", {"round": rounds})
    assert last_valid_round(run_dir / "checkpoints") == rounds


def test_a_restarted_coordinator_whose_job_has_finished_submits_at_once(monkeypatch, tmp_path):
    """Its checkpoints hold the last round: exporting needs no organization, so no wait."""
    _finished_checkpoints(tmp_path / "run", 2)
    link = FakeLink([[]])
    code = run_coordinator(monkeypatch, tmp_path, link, **{"min-nodes": 2, "node-wait-timeout": 1,
                                                           "num-rounds": 2})
    assert code == 2   # the fake run ends failed
    assert link.calls == ["submit", "follow", "wait", "stop-follow"]


def test_a_job_with_rounds_left_still_waits_for_its_agents(monkeypatch, tmp_path):
    _finished_checkpoints(tmp_path / "run", 1)
    link = FakeLink([[], [3, 4]])
    run_coordinator(monkeypatch, tmp_path, link, **{"min-nodes": 2, "node-wait-timeout": 60, "num-rounds": 2})
    assert link.calls[:3] == ["online", "online", "submit"]


def test_a_superlink_that_died_is_named_not_a_refused_connection(tmp_path):
    link = SuperLinkProcess()
    link.log_path = tmp_path / "superlink.log"
    link.log_path.write_text("Address already in use\n")
    link.proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    link.proc.wait()
    with pytest.raises(RuntimeError, match=r"SuperLink exited with 3 while nodes were awaited:\n.*already in use"):
        link.online_node_ids()


# ------------------------------------------------------------------ the service's job manager
class FakeDriver(FakeSuperLink):
    """submit_run / run_status / stop_run / online_node_ids, as the job manager asks them."""

    run_id = 100

    def run_status(self, run_id: int) -> str:
        return "finished:failed"

    def stop_run(self, run_id: int) -> None:
        self.calls.append("stop")


TASK = {"model": "tiny-llama", "num-rounds": 1, "min-nodes": 2}


def settle(manager: JobManager, job_id: str, state: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while manager.store.get(job_id).state != state:
        assert time.monotonic() < deadline, manager.store.get(job_id)
        time.sleep(0.05)


def test_a_service_job_is_submitted_once_its_agents_are_online(tmp_path):
    driver = FakeDriver([[], [4], [4, 5]])
    manager = JobManager(tmp_path, driver, tmp_path, poll=0.05).start()
    try:
        job = manager.submit(Submission("tickets", {**TASK, "node-wait-timeout": 60}))
        settle(manager, job.id, FAILED)   # the fake run fails: the job ran
    finally:
        manager.stop()
    assert driver.calls == ["online", "online", "online", "submit"]
    assert manager.store.get(job.id).run_id == 100


def test_a_service_job_whose_agents_never_come_fails_with_the_quorum_error_unsubmitted(tmp_path):
    driver = FakeDriver([[]])
    manager = JobManager(tmp_path, driver, tmp_path, poll=0.05).start()
    try:
        job = manager.submit(Submission("tickets", {**TASK, "node-wait-timeout": 1}))
        settle(manager, job.id, FAILED)
    finally:
        manager.stop()
    assert "QuorumError: only 0 organization(s) online after 1s; min-nodes=2" in manager.store.get(job.id).error
    assert "submit" not in driver.calls


def test_a_service_job_cancelled_or_left_while_it_waits_for_agents_is_never_submitted(tmp_path):
    driver = FakeDriver([[]])
    manager = JobManager(tmp_path, driver, tmp_path, poll=0.05).start()
    try:
        cancelled = manager.submit(Submission("tickets", {**TASK, "node-wait-timeout": 600}))
        settle(manager, cancelled.id, RUNNING)
        manager.cancel(cancelled.id)
        waiting = manager.submit(Submission("tickets", {**TASK, "node-wait-timeout": 600}))
        settle(manager, waiting.id, RUNNING)   # the worker let the cancelled job go
    finally:
        manager.stop(timeout=10)
    assert manager.store.get(cancelled.id).state == CANCELLED
    # the coordinator stopped while it waited: the job stays running, to resume at the next start
    assert manager.store.get(waiting.id).state == RUNNING and manager.store.get(waiting.id).run_id is None
    assert "submit" not in driver.calls


def test_the_serverapps_log_does_not_feed_itself_with_its_upload_requests():
    """Flower uploads the ServerApp's log every 0.2 s over HTTP; an INFO line per request would be
    uploaded by the next request, five requests a second for as long as the run lasts."""
    probe = ("import logging, server.app as app; app._show_progress(); "
             "logging.getLogger('httpx').info('HTTP Request: POST /v1/runtime/push-logs'); "
             "logging.getLogger('silotune.server').info('round 1: 2 organization(s) sampled')")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1], check=True)
    assert "round 1: 2 organization(s) sampled" in out.stderr   # the round log still shows
    assert "push-logs" not in out.stderr
