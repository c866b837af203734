"""The jobs of the coordinator service, in SQLite: ``state_dir/jobs.sqlite``.

One row a job (the schema below is read by the dashboard as well: keep it)::

    queued ──▶ running ──▶ finished | failed | cancelled
       │          │
       │          └──▶ queued      (requeued: the coordinator stopped while it ran)
       └──▶ cancelled

Every change is one ``UPDATE … WHERE state IN (…)``: a transition from a state the
job is no longer in changes nothing and raises ``JobStateError``, so a job cancelled
while its run was ending stays cancelled whatever the worker finds afterwards.

``run_id`` is Flower's run id, an unsigned 64-bit number, stored as SQLite's signed INTEGER:
ids from 2**63 up are stored wrapped (negative); a reader takes ``run_id % 2**64``.

Each call opens its own connection (the API's threads and the manager's worker use the
store at once); WAL lets readers such as the dashboard read while a job is written.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

JOBS_DB = "jobs.sqlite"
JOBS_DIR = "jobs"  # state_dir/jobs/<id>/run is a job's run dir

QUEUED, RUNNING, FINISHED, FAILED, CANCELLED = "queued", "running", "finished", "failed", "cancelled"
STATES = (QUEUED, RUNNING, FINISHED, FAILED, CANCELLED)
ENDED = (FINISHED, FAILED, CANCELLED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    specialist TEXT,
    spec_json TEXT,
    state TEXT,
    run_id INTEGER,
    run_dir TEXT,
    created_at TEXT,
    started_at TEXT,
    finished_at TEXT,
    specialist_version INTEGER,
    error TEXT,
    continue_from TEXT
)
"""
COLUMNS = ("id", "specialist", "spec_json", "state", "run_id", "run_dir", "created_at", "started_at",
           "finished_at", "specialist_version", "error", "continue_from")


class JobNotFound(KeyError):
    """No job has that id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "no such job"


class JobStateError(ValueError):
    """A transition from a state the job is not in (e.g. cancelling a finished job)."""


@dataclass(frozen=True)
class Job:
    id: str
    specialist: str
    spec: dict[str, Any]          # the run-config keys the operator submitted (spec_json)
    state: str
    run_id: int | None
    run_dir: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    specialist_version: int | None
    error: str | None
    continue_from: str | None     # "name:version", resolved at submit time

    @property
    def ended(self) -> bool:
        return self.state in ENDED


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def job_run_dir(state_dir: Path | str, job_id: str) -> Path:
    """Where job ``job_id`` runs (absolute): the same dir on every attempt, so a requeued
    job resumes from its checkpoints."""
    return Path(state_dir).expanduser().resolve() / JOBS_DIR / job_id / "run"


class JobStore:
    def __init__(self, state_dir: Path | str) -> None:
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.state_dir / JOBS_DB
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout = 30000")
        try:
            yield db
        finally:
            db.close()

    # ------------------------------------------------------------------ reading
    def get(self, job_id: str) -> Job:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        return _job(row)

    def list(self, states: tuple[str, ...] = STATES) -> list[Job]:
        """Jobs in these states, oldest first (the order they were submitted, hence run)."""
        marks = ",".join("?" * len(states))
        with self._connect() as db:
            rows = db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY rowid", states).fetchall()
        return [_job(row) for row in rows]

    def next_queued(self) -> Job | None:
        queued = self.list((QUEUED,))
        return queued[0] if queued else None

    # ------------------------------------------------------------------ writing
    def create(self, specialist: str, spec: Mapping[str, Any], *, continue_from: str | None = None) -> Job:
        """A new queued job with the next id (job-0001, job-0002, …)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")  # the id and the insert in one write transaction
            try:
                count = db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
                job_id = f"job-{count + 1:04d}"
                while db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone():
                    count += 1
                    job_id = f"job-{count + 1:04d}"
                db.execute(
                    "INSERT INTO jobs (id, specialist, spec_json, state, run_dir, created_at, continue_from) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (job_id, specialist, json.dumps(dict(spec), sort_keys=True), QUEUED,
                     str(job_run_dir(self.state_dir, job_id)), utc_now(), continue_from))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return self.get(job_id)

    def mark_running(self, job_id: str) -> Job:
        # started_at is the first start: a resumed job keeps it
        return self._move(job_id, (QUEUED,), RUNNING, "started_at = COALESCE(started_at, ?), error = NULL",
                          (utc_now(),))

    def set_run_id(self, job_id: str, run_id: int) -> Job:
        return self._move(job_id, (RUNNING,), RUNNING, "run_id = ?", (to_sqlite_integer(run_id),))

    def mark_finished(self, job_id: str, specialist_version: int) -> Job:
        return self._move(job_id, (RUNNING,), FINISHED, "finished_at = ?, specialist_version = ?",
                          (utc_now(), int(specialist_version)))

    def mark_failed(self, job_id: str, error: str) -> Job:
        return self._move(job_id, (RUNNING,), FAILED, "finished_at = ?, error = ?", (utc_now(), error[-4000:]))

    def mark_cancelled(self, job_id: str) -> Job:
        return self._move(job_id, (QUEUED, RUNNING), CANCELLED, "finished_at = ?", (utc_now(),))

    def requeue(self, job_id: str) -> Job:
        """A job left running when the coordinator stopped goes back to the queue (same id, same
        run dir: it resumes from its last checkpoint)."""
        return self._move(job_id, (RUNNING,), QUEUED, "run_id = run_id", ())

    def _move(self, job_id: str, sources: tuple[str, ...], target: str, sets: str, values: tuple) -> Job:
        marks = ",".join("?" * len(sources))
        with self._connect() as db:
            changed = db.execute(f"UPDATE jobs SET state = ?, {sets} WHERE id = ? AND state IN ({marks})",
                                 (target, *values, job_id, *sources)).rowcount
        if not changed:
            job = self.get(job_id)  # JobNotFound if there is none
            raise JobStateError(f"job {job_id} is {job.state}, not {' or '.join(sources)}")
        return self.get(job_id)


def to_sqlite_integer(run_id: int) -> int:
    """Flower's run ids are unsigned 64-bit, SQLite's INTEGER signed: ids from 2**63 up are
    stored wrapped (negative). Read them back with ``from_sqlite_integer`` (or ``% 2**64``)."""
    return int(run_id) - (1 << 64) if int(run_id) >= 1 << 63 else int(run_id)


def from_sqlite_integer(value: int | None) -> int | None:
    return None if value is None else int(value) % (1 << 64)


def _job(row: sqlite3.Row) -> Job:
    return Job(id=row["id"], specialist=row["specialist"], spec=json.loads(row["spec_json"] or "{}"),
               state=row["state"], run_id=from_sqlite_integer(row["run_id"]), run_dir=row["run_dir"], created_at=row["created_at"],
               started_at=row["started_at"], finished_at=row["finished_at"],
               specialist_version=row["specialist_version"], error=row["error"],
               continue_from=row["continue_from"])
