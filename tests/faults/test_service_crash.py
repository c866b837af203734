"""The coordinator service SIGKILLed mid-job (issue 13, item 5).

`silotune coordinator --serve` and two agents (`silotune agent start`) as processes on
127.0.0.1, tiny model, 3 rounds; an operator submits one job through the CLI. Once round 1
is checkpointed and round 2 has started, the whole service is SIGKILLed: the CLI process and
everything it started (SuperLink, SuperExec, ServerApp, gateway), snapshotted as its
descendants and killed by PID. The agents stay up. The service is started again on the same
state dir and ports; the job, left `running` in jobs.sqlite, is requeued, resumes from its
round-1 checkpoint and finishes. Then:

* the registry holds exactly one version of the specialist, complete: its adapter's sha256
  equals the registry row's and its provenance's, and the version folder is a byte copy of
  the run's specialist/; no temporary folder is left under state_dir/specialists/;
* the job's report.json has rounds 0..3, once each (events.jsonl may hold the round that
  was under way at the kill twice: documented in server/events.py);
* (in-process, seconds) a service killed after the registry committed the specialist but
  before the job was marked finished: the restarted service marks the job finished with that
  version; it neither runs the job again nor registers the same run as a second version;
* "ends on the same adapter as an uninterrupted run": the same job (same settings, same
  organizations and silos, same seed) run uninterrupted in the one-job mode
  (`silotune coordinator`, tests/faults/conftest.py's Deployment) ends on the same final
  checkpoint — adapter, strategy state, RNG state, who took part — and the same exported
  adapter, byte for byte, as test_deployment_faults.py asserts for the one-job mode.
  (The reference is the one-job mode rather than a second service run: the service runs
  the same ServerApp with the same run config, and one run fewer keeps this test inside
  `make test-slow`'s budget.)

Every process is started through the suite's Deployment (tagged, stopped by PID at the end;
the `deployment` fixture fails the test if anything is left alive).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_deployment_faults import BASE, checkpoint_bytes, figure
from test_jobs_service import TASK, FakeSuperLink, manager_for, wait_until
from test_jobs_service import exported  # noqa: F401  (a fixture: a real tiny specialist folder)

from runtime.flower_processes import alive, free_port
from server import pki
from server.checkpoint import ADAPTER_WEIGHTS
from server.events import EVENTS_FILE, ROUND_FINISHED, ROUND_STARTED, read_events
from server.service.manager import Submission
from server.service.store import FINISHED, JOBS_DB
from server.specialists import PROVENANCE, SpecialistRegistry, file_sha256


SILOTUNE = str(Path(sys.executable).with_name("silotune"))
ROUNDS = 3
AGENTS = ["bank-a", "bank-b"]
JOB = "job-0001"
NAME = "crashproof"
# the same job in both modes; job-id set, so the one-job reference and the service job are
# the same job for the organizations (the service would otherwise name it NAME-job-0001)
SETTINGS: dict[str, Any] = {**BASE, "model": "tiny-llama", "job-id": "svc-crash", "num-rounds": ROUNDS,
                            "min-nodes": len(AGENTS), "round-timeout": 300}


def sets(settings: dict[str, Any]) -> list[str]:
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def job_row(state_dir: Path) -> dict[str, Any] | None:
    """The job's row of jobs.sqlite, read-only (the service writes it)."""
    path = state_dir / JOBS_DB
    if not path.exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    db.row_factory = sqlite3.Row
    try:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (JOB,)).fetchone()
    except sqlite3.OperationalError:   # the table is not there yet
        return None
    finally:
        db.close()
    return dict(row) if row is not None else None


def round_started(run_dir: Path, server_round: int) -> bool:
    return any(e["event"] == ROUND_STARTED and e.get("round") == server_round
               for e in read_events(run_dir / EVENTS_FILE))


def wait_for(what: str, check: Any, coordinator: subprocess.Popen, tail: Any, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.time()
        if coordinator.poll() is not None:
            raise AssertionError(f"the service exited ({coordinator.returncode}) before {what}:\n{tail()}")
        time.sleep(0.2)
    raise AssertionError(f"{what}: not after {timeout}s:\n{tail()}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_service_sigkilled_mid_job_resumes_to_the_uninterrupted_adapter(deployment: Any, tmp_path: Path) -> None:
    started = time.monotonic()

    # -- the uninterrupted reference: the same job in the one-job mode ---------------------------
    reference = deployment(SETTINGS, AGENTS)
    reference.start_coordinator()
    reference.start_agents()
    assert reference.coordinators[-1].wait(timeout=600) == 0, reference.tail()
    want = checkpoint_bytes(reference.run_dir, ROUNDS)
    assert reference.stop() == []
    reference_seconds = time.monotonic() - started

    # -- the service, its operator, two agents ---------------------------------------------------
    d = deployment(SETTINGS, AGENTS)   # same organizations, same silo rows as the reference
    pki_dir = tmp_path / "pki"
    pki.init_ca(pki_dir, days=2)
    pki.issue_server_cert(pki_dir, ["127.0.0.1"], days=1)
    operator = pki.issue_operator_cert(pki_dir, "ops", days=1)
    api_port = free_port()
    operator_env = {**d.env, "SILOTUNE_API": f"127.0.0.1:{api_port}", "SILOTUNE_CA_CERT": str(operator.ca_cert),
                    "SILOTUNE_OPERATOR_CERT": str(operator.cert), "SILOTUNE_OPERATOR_KEY": str(operator.key)}
    serve = [SILOTUNE, "coordinator", "--serve", "--insecure", "--pki-dir", str(pki_dir),
             "--state-dir", str(d.state_dir), "--port", str(d.port), "--api-port", str(api_port)]
    run_dir = d.state_dir / "jobs" / JOB / "run"

    def start_service() -> subprocess.Popen:
        # the agents dial the gateway on d.port, operators the API on api_port: both fixed, so a
        # restarted service is found again where it was
        proc = d._popen(serve, d.root / f"coordinator-{len(d.coordinators)}.log", d.env)
        d.coordinators.append(proc)
        wait_for_api(operator_env["SILOTUNE_API"], operator, proc, d.tail)
        return proc

    def silotune(*args: str, timeout: float = 120) -> str:
        done = subprocess.run([SILOTUNE, *args], env=operator_env, cwd=d.root, capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0, \
            f"silotune {' '.join(args)}: {done.stdout[-3000:]}{done.stderr[-3000:]}\n{d.tail()}"
        return done.stdout

    first = start_service()
    d.start_agents()
    service_started = time.monotonic()
    assert f"{JOB} queued" in silotune("job", "submit", "--specialist", NAME, *sets(SETTINGS))

    # -- mid-round 2: round 1 on disk, round 2 started; SIGKILL the service's whole tree ----------
    wait_for("round 1 checkpointed and round 2 started",
             lambda: 1 in rounds_on_disk(run_dir) and round_started(run_dir, 2), first, d.tail, timeout=600)
    before = job_row(d.state_dir)
    assert before is not None and before["state"] == "running" and before["run_id"] is not None, before
    assert 2 not in rounds_on_disk(run_dir), "round 2 ended before the kill: too late to test a resume"
    killed = d.kill_coordinator()   # the CLI, SuperLink, SuperExec, ServerApp, gateway: by PID, at once
    killed_at = time.time()
    assert alive(killed) == [], "part of the killed service is still running"
    assert len(killed) >= 4, f"expected the service and the processes it started, killed: {killed}"
    assert all(p.poll() is None for p in d.agents.values()), "an agent died with the coordinator"
    assert job_row(d.state_dir)["state"] == "running"  # type: ignore[index]

    # -- restart on the same state dir and ports: the job resumes and ends ----------------------
    second = start_service()
    resumed_at = wait_for("round 2 checkpointed again", lambda: 2 in rounds_on_disk(run_dir), second, d.tail,
                          timeout=600)
    figure("service killed mid-round 2: round 2 checkpointed this long after the kill (s)",
           round(resumed_at - killed_at))
    watched = silotune("job", "watch", JOB, timeout=600)
    assert f"{JOB} finished: specialist {NAME}:1" in watched, watched
    after = job_row(d.state_dir)
    assert after is not None and after["state"] == "finished" and after["specialist_version"] == 1, after
    assert after["run_id"] != before["run_id"], "the resumed job should run as a new Flower run"
    listed = silotune("job", "ls")
    assert listed.count("│ finished │") == 1, listed
    service_seconds = time.monotonic() - service_started

    # -- the registry: one version, complete, no half-written folder -----------------------------
    folders = d.state_dir / "specialists"   # looked at before this process opens the registry (that cleans up)
    assert sorted(p.relative_to(folders).as_posix() for p in folders.iterdir()) == [NAME]
    assert sorted(p.name for p in (folders / NAME).iterdir()) == ["v1"], "a temporary folder was left behind"
    registry = SpecialistRegistry(d.state_dir)
    versions = registry.list()
    assert [(s.name, s.version, s.job_id) for s in versions] == [(NAME, 1, JOB)]
    specialist = versions[0]
    sha = file_sha256(specialist.path / ADAPTER_WEIGHTS)
    provenance = json.loads((specialist.path / PROVENANCE).read_text())
    assert sha == specialist.adapter_sha256 == provenance["adapter_sha256"] == \
        specialist.provenance["adapter_sha256"]
    assert files(specialist.path) == files(run_dir / "specialist"), \
        "the registered version is not a copy of the run's export"

    # -- the job's history: every round once in the report; the redone round twice in the events --
    report = json.loads((run_dir / "report.json").read_text())
    assert [h["round"] for h in report["history"]] == list(range(ROUNDS + 1))
    events = read_events(run_dir / EVENTS_FILE)
    started_rounds = [e["round"] for e in events if e["event"] == ROUND_STARTED]
    finished_rounds = [e["round"] for e in events if e["event"] == ROUND_FINISHED]
    assert started_rounds.count(1) == 1 and started_rounds.count(2) >= 2, started_rounds
    assert sorted(set(finished_rounds)) == list(range(ROUNDS + 1)) and finished_rounds.count(1) == 1, \
        finished_rounds

    # -- the same adapter as the uninterrupted run, byte for byte --------------------------------
    got = checkpoint_bytes(run_dir, ROUNDS)
    assert got["took_part"] == want["took_part"]
    assert got["rng"] == want["rng"], "RNG state differs from the uninterrupted run"
    assert got["strategy"] == want["strategy"], "strategy state differs from the uninterrupted run"
    assert got["adapter"] == want["adapter"], "final adapter differs from the uninterrupted run"
    assert got["specialist"] == want["specialist"], "exported specialist differs"
    assert (specialist.path / ADAPTER_WEIGHTS).read_bytes() == want["specialist"], \
        "the registered specialist differs from the uninterrupted run's"
    figure("uninterrupted one-job run / crashed-and-resumed service run (s)",
           (round(reference_seconds), round(service_seconds)))

    # -- everything stops by PID: the service, the agents and every process they started ---------
    second.send_signal(signal.SIGTERM)   # the restarted service stops cleanly (job ended: nothing to leave)
    assert second.wait(timeout=60) == 0, d.tail()
    everything = [*d.started, *killed]
    assert d.stop() == [], "tagged processes left running"
    assert alive(everything) == []


def rounds_on_disk(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    names = os.listdir(root) if root.is_dir() else []
    return sorted(int(n[len("round-"):]) for n in names if n.startswith("round-") and n[len("round-"):].isdigit())


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def wait_for_api(address: str, operator: pki.OperatorFiles, coordinator: subprocess.Popen, tail: Any,
                 timeout: float = 120) -> None:
    """tests/test_service_deployment.py's wait, with this suite's log tail."""
    from test_service_deployment import wait_for_api as wait

    try:
        wait(address, operator, coordinator, Path(os.devnull), timeout)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{tail()}") from None


def test_killed_between_registration_and_finish_the_job_is_not_registered_twice(tmp_path: Path,
                                                                               exported: Path) -> None:  # noqa: F811
    """The state a SIGKILL leaves between SpecialistRegistry.register's commit and the store's
    mark_finished (JobManager._run_job): version 1 registered, the job still `running`."""
    first = manager_for(tmp_path, FakeSuperLink(exported)).start()
    try:
        job = first.submit(Submission("tickets", TASK))
        wait_until(lambda: first.store.get(job.id).ended)
    finally:
        first.stop()
    assert first.registry.get("tickets", 1).job_id == job.id
    db = sqlite3.connect(tmp_path / JOBS_DB)
    with db:
        db.execute("UPDATE jobs SET state = 'running', finished_at = NULL, specialist_version = NULL WHERE id = ?",
                   (job.id,))
    db.close()

    superlink = FakeSuperLink(exported)
    restarted = manager_for(tmp_path, superlink).start()
    try:
        wait_until(lambda: restarted.store.get(job.id).ended)
        resumed = restarted.store.get(job.id)
    finally:
        restarted.stop()
    assert resumed.state == FINISHED and resumed.specialist_version == 1
    assert [s.ref for s in restarted.registry.list()] == ["tickets:1"], "the same run registered twice"
    assert superlink.runs == {}, "a job whose specialist is registered was run again"
