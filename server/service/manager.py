"""The job manager: queued jobs run one at a time on the SuperLink, oldest first.

A submitted job is checked at once (``JobConfig.from_run_config`` on the run config it
will run with; the specialist to continue from is resolved to ``name:version``) and
stored queued. A worker thread then, for each job in turn (``_run_job`` reads top to
bottom):

1. marks it running; its run dir is ``state_dir/jobs/<id>/run`` on every attempt;
2. once min-nodes organizations are online (``_agents_online``: no run, so no ServerApp
   and no log stream, while nobody is there), submits the run config (the operator's keys +
   ``run-dir``, ``init-adapter`` when it continues a specialist, ``job-id`` if the operator
   set none) with ``flwr run``;
3. waits for the run to end (``wait_for_run``);
4. registers ``run_dir/specialist`` as the next version of the job's specialist
   (server/specialists.py) and marks the job finished, or marks it failed with the reason.

Crash safety: a job is ``running`` in the store from step 1 until it ends. A coordinator
that stops (or is killed) while a job runs leaves it ``running``; the next ``start()``
requeues it ahead of the queued ones, and because its run dir and run config are the same
the round loop resumes from its last checkpoint (server/checkpoint.py). A job killed after
its specialist was registered but before it was marked finished is marked finished with that
version, not run (and registered) again.

Cancelling: a queued job is marked cancelled and never starts; a running one is marked
cancelled, then its run is stopped (``flwr stop``). The store moves a job out of
``running`` only once, so the worker's later verdict on a cancelled job changes nothing.

Side-by-side jobs are not done: one SuperLink run at a time, as the agents' resident
trainers each hold one model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from server.checkpoint import last_valid_round
from server.exchange import NODE_POLL_SECONDS, too_few_nodes
from server.job_config import JobConfig
from server.service.store import QUEUED, RUNNING, Job, JobStateError, JobStore, job_run_dir
from server.specialists import RegistryError, Specialist, SpecialistRegistry, check_name, parse_ref
from server.superlink import FINISHED

log = logging.getLogger("silotune.service")

#: run-config keys the service sets itself; an operator's value for them is refused
SERVICE_KEYS = ("run-dir", "init-adapter")
COMPLETED = f"{FINISHED}:completed"


class RunDriver(Protocol):
    """What the manager needs of a SuperLink (server.superlink.SuperLinkProcess is one); its
    ``online_node_ids`` and ``run_logs`` are used where it has them."""

    def submit_run(self, app_dir: Path | str, run_config: Mapping[str, object]) -> int: ...
    def run_status(self, run_id: int) -> str: ...
    def stop_run(self, run_id: int) -> None: ...


class SubmitError(ValueError):
    """A job the service refuses to queue, and why."""


@dataclass(frozen=True)
class Submission:
    """What an operator asks for: the specialist's name, run-config keys, what to continue."""

    specialist: str
    run_config: Mapping[str, Any]
    continue_from: str | None = None


class JobManager:
    def __init__(self, state_dir: Path | str, superlink: RunDriver, app_dir: Path | str, *,
                 poll: float = 3.0, registry: SpecialistRegistry | None = None) -> None:
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.superlink = superlink
        self.app_dir = Path(app_dir)
        self.poll = poll
        self.store = JobStore(self.state_dir)
        self.registry = registry or SpecialistRegistry(self.state_dir)
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._resume_first: list[str] = []
        self._current_run: int | None = None   # the worker's run, stopped if its job fails
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> JobManager:
        """Requeue the jobs a previous coordinator left running (they resume), then start the worker."""
        for job in self.store.list((RUNNING,)):
            self.store.requeue(job.id)
            self._resume_first.append(job.id)
            log.info("job %s was running when the coordinator stopped: requeued, it resumes from its "
                     "last checkpoint", job.id)
        self._thread = threading.Thread(target=self._work, name="job-manager", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs. A running job stays `running` in the store (its run ends with the
        SuperLink); the next start resumes it."""
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ operators
    def submit(self, submission: Submission) -> Job:
        """Check the job as it will run, then queue it; SubmitError (nothing queued) otherwise."""
        name, spec = submission.specialist, dict(submission.run_config)
        continue_from = None
        try:
            if submission.continue_from:
                parent = self.registry.resolve(submission.continue_from)
                name = name or parent.name
                if name != parent.name:
                    raise SubmitError(f"--continue {submission.continue_from}: the continued specialist is "
                                      f"registered under its own name ({parent.name!r}), not {name!r}")
                continue_from = parent.ref
            check_name(name)
        except RegistryError as err:
            raise SubmitError(str(err)) from None
        owned = [key for key in SERVICE_KEYS if key in spec]
        if owned:
            raise SubmitError(f"{', '.join(owned)}: set by the coordinator service (run-dir is "
                              "state_dir/jobs/<id>/run; init-adapter comes from --continue)")
        # checked with the values the service adds, as it will run (the run dir is a placeholder)
        self.run_config(spec, name, "job-0000", continue_from)
        job = self.store.create(name, spec, continue_from=continue_from)
        log.info("job %s queued: specialist %s%s", job.id, name,
                 f", continuing {continue_from}" if continue_from else "")
        with self._wake:
            self._wake.notify_all()
        return job

    def cancel(self, job_id: str) -> Job:
        before = self.store.get(job_id)
        job = self.store.mark_cancelled(job_id)   # JobStateError if it has ended already
        if before.state == RUNNING:
            # (a job cancelled while its run is being submitted has no run id yet: the worker
            # finds it cancelled once it has one, and stops it then)
            self._stop_run(job)
        log.info("job %s cancelled", job_id)
        return job

    def run_config(self, spec: Mapping[str, Any], name: str, job_id: str,
                   continue_from: str | None) -> dict[str, Any]:
        """The run config a job runs with; SubmitError when JobConfig refuses it."""
        run_config = dict(spec)
        run_config.setdefault("job-id", f"{name}-{job_id}")   # unique per job: organizations' ledgers and policies
        run_config["run-dir"] = str(job_run_dir(self.state_dir, job_id))
        if continue_from:
            try:
                run_config["init-adapter"] = str(self.registry.resolve(continue_from).path)
            except RegistryError as err:
                raise SubmitError(str(err)) from None
        try:
            JobConfig.from_run_config(run_config)
        except ValueError as err:
            raise SubmitError(str(err)) from None
        return run_config

    # ------------------------------------------------------------------ the worker
    def _work(self) -> None:
        while not self._stopping.is_set():
            job = self._next_job()
            if job is None:
                with self._wake:
                    self._wake.wait(timeout=self.poll)
                continue
            self._current_run = None
            try:
                self._run_job(job)
            except Exception as err:  # a job's failure must never end the worker
                log.exception("job %s failed", job.id)
                self._end(job.id, self.store.mark_failed, f"{type(err).__name__}: {err}")
                if self._current_run is not None:   # a run of a failed job must not go on
                    self._stop_run(job, self._current_run)

    def _next_job(self) -> Job | None:
        while self._resume_first:
            job = self.store.get(self._resume_first.pop(0))
            if job.state == QUEUED:
                return job
        return self.store.next_queued()

    def _run_job(self, job: Job) -> None:
        try:
            job = self.store.mark_running(job.id)
        except JobStateError:
            return   # cancelled between the look and the start
        registered = self._registered(job)
        if registered is not None:
            # killed between the registry's commit and the store's verdict: the job is done; running it
            # again would register the same run as a second version
            self._end(job.id, self.store.mark_finished, registered.version)
            log.info("job %s finished before the coordinator stopped: specialist %s", job.id, registered.ref)
            return
        run_config = self.run_config(job.spec, job.specialist, job.id, job.continue_from)
        if not self._agents_online(job.id, JobConfig.from_run_config(run_config)):
            log.info("job %s: not submitted (the coordinator is stopping, or the job was cancelled)", job.id)
            return
        run_id = self._current_run = self.superlink.submit_run(self.app_dir, run_config)
        log.info("job %s: run %s submitted (run dir %s)", job.id, run_id, run_config["run-dir"])
        try:
            job = self.store.set_run_id(job.id, run_id)
        except JobStateError:   # cancelled while it was being submitted
            self._stop_run(job, run_id)
            return
        status = wait_for_run(self.superlink, run_id, self._stopping, self.poll)
        if status is None:
            log.info("job %s left running: the coordinator is stopping; it resumes at the next start", job.id)
            return
        self._save_log(job.id, run_id)
        if status != COMPLETED:
            self._end(job.id, self.store.mark_failed,
                      f"run {run_id} ended {status}; its log: {job_run_dir(self.state_dir, job.id).parent}"
                      f"/run-{run_id}.log")
            return
        specialist = self.registry.register(job.specialist, Path(run_config["run-dir"]), job_id=job.id)
        self._end(job.id, self.store.mark_finished, specialist.version)
        log.info("job %s finished: specialist %s", job.id, specialist.ref)

    def _agents_online(self, job_id: str, cfg: JobConfig) -> bool:
        """Wait until the job's min-nodes organizations are online (asked every NODE_POLL_SECONDS over
        the SuperLink's in-process Control API connection): True then; False if the coordinator stops
        (the job stays running and resumes at the next start) or the job is cancelled meanwhile; the
        job's own QuorumError after its node-wait-timeout. A driver that cannot list nodes: True at
        once, and the submitted job waits for its nodes itself. A job whose checkpoints hold its
        last round already needs none: True at once."""
        online = getattr(self.superlink, "online_node_ids", None)
        if online is None or last_valid_round(cfg.checkpoint_dir) >= cfg.num_rounds:
            return True
        deadline = time.monotonic() + cfg.node_wait_timeout
        while True:
            count = len(online())
            if count >= cfg.min_nodes:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                raise too_few_nodes(count, cfg.min_nodes, cfg.node_wait_timeout)
            if self._stopping.wait(min(NODE_POLL_SECONDS, left)) or self.store.get(job_id).state != RUNNING:
                return False

    def _registered(self, job: Job) -> Specialist | None:
        """The version this job registered already, if any (job ids are unique per state dir)."""
        mine = [s for s in self.registry.list(job.specialist) if s.job_id == job.id]
        return mine[-1] if mine else None

    def _save_log(self, job_id: str, run_id: int) -> None:
        """The run's ServerApp log next to the job's run dir (the SuperLink keeps it in its database)."""
        logs = getattr(self.superlink, "run_logs", None)
        if logs is None:
            return
        try:
            text = logs(run_id)
        except Exception as err:
            log.warning("job %s: no log of run %s: %s", job_id, run_id, err)
            return
        job_dir = job_run_dir(self.state_dir, job_id).parent
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / f"run-{run_id}.log").write_text(text, encoding="utf-8")

    def _end(self, job_id: str, mark: Any, value: Any) -> None:
        """Record a job's end unless it ended already (cancelled while its run finished)."""
        try:
            mark(job_id, value)
        except JobStateError:
            log.info("job %s: %s (run outcome %r not recorded)", job_id, self.store.get(job_id).state, value)

    def _stop_run(self, job: Job, run_id: int | None = None) -> None:
        run_id = run_id if run_id is not None else job.run_id
        if run_id is None:
            return
        try:
            self.superlink.stop_run(run_id)
        except Exception as err:  # a run that ended meanwhile cannot be stopped: nothing to do
            log.warning("job %s: stopping run %s: %s", job.id, run_id, err)


def wait_for_run(superlink: RunDriver, run_id: int, stopping: threading.Event, poll: float,
                 tolerated_errors: int = 5) -> str | None:
    """The run's final status ('finished:completed|failed|stopped'), or None once ``stopping``
    is set. Asks ``run_status`` (one in-process Control API call) every ``poll`` seconds; a few
    failed asks in a row are tolerated (a busy SuperLink), more end the wait with the error."""
    errors = 0
    while True:
        try:
            status = superlink.run_status(run_id)
            errors = 0
        except Exception:
            errors += 1
            if errors > tolerated_errors:
                raise
            status = ""
        if status.startswith(FINISHED):
            return status
        if stopping.wait(poll):
            return None
