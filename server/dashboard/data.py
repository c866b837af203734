"""What the dashboard shows, read from the coordinator's state directory, never written.

Three sources, each written by someone else while the dashboard reads:

- ``state_dir/jobs.sqlite`` (server/service/store.py): one row per job, its state and run dir;
- each job's ``<run_dir>/events.jsonl`` (server/events.py): the rounds as they happen;
- ``state_dir/specialists.sqlite`` (server/specialists.py): the registered specialists.

SQLite files are opened read-only (``mode=ro``), so the dashboard can never change them,
lock them for writing or create them; a file that does not exist yet is an empty list. Their
writers use WAL mode, so a read never waits for a write.

Everything here is data: organization names, details and rejection reasons came from the
network and are handed on as JSON strings; the page inserts them as text.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.events import EVENTS_FILE, REPLY, ROUND_FINISHED, ROUND_STARTED, Event, read_events
from server.service.store import COLUMNS as JOB_COLUMNS
from server.service.store import JOBS_DB as JOBS_DATABASE
from server.specialists import DATABASE as SPECIALISTS_DATABASE

#: what the specialists table shows; the registry's JSON columns (task spec, metrics, provenance)
#: are the registry API's business, not a list's
SPECIALIST_COLUMNS = ("name", "version", "created_at", "job_id", "base_model", "metric", "epsilon",
                      "secure_aggregation", "adapter_sha256", "parent", "rounds")
#: an organization's evaluation numbers that are bookkeeping, not a learning curve
NOT_CURVES = frozenset({"num_examples", "base_model_loads", "resident_pid"})
#: the run config's metric names → the evaluation's keys
METRIC_KEYS = {"accuracy": "accuracy", "macro-f1": "macro_f1", "exact-match": "exact_match",
               "perplexity": "perplexity", "loss": "loss"}
#: what neither the events nor the jobs table carry: the page shows "—" for it (bytes: jobs
#: from before server/traffic.py counted them)
NOT_RECORDED = {"bytes": "this job's round events do not count bytes"}


# ---- SQLite, read-only --------------------------------------------------------------

def _read_rows(database: Path, table: str, columns: Iterable[str], order: str) -> list[dict[str, Any]]:
    """The rows of ``table`` (only the ``columns`` it has), or [] while the file or table does not exist."""
    if not database.is_file():
        return []
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5.0)
    try:
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        wanted = [c for c in columns if c in present]
        if not wanted:
            return []
        cursor = conn.execute(f"SELECT {', '.join(wanted)} FROM {table} ORDER BY {order}")
        return [dict(zip(wanted, row)) for row in cursor.fetchall()]
    finally:
        conn.close()


def read_jobs(state_dir: Path) -> list[dict[str, Any]]:
    """Every job of the jobs table, newest first."""
    return _read_rows(state_dir / JOBS_DATABASE, "jobs", JOB_COLUMNS, "created_at DESC, rowid DESC")


def read_specialists(state_dir: Path) -> list[dict[str, Any]]:
    """Every registered specialist version, newest first."""
    rows = _read_rows(state_dir / SPECIALISTS_DATABASE, "specialists", SPECIALIST_COLUMNS, "rowid DESC")
    for row in rows:
        if "secure_aggregation" in row:
            row["secure_aggregation"] = bool(row["secure_aggregation"])
        if "name" in row and "version" in row:
            row["ref"] = f"{row['name']}:{row['version']}"
    return rows


# ---- one job's rounds, from its events ----------------------------------------------

@dataclass
class RoundRow:
    """One round as the rounds table shows it."""

    round: int
    started: str | None = None
    finished: str | None = None
    sampled: int | None = None
    attempts: int = 0
    replies: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None

    @property
    def epsilon(self) -> float | None:
        """ε spent after this round (differentially private strategies: server/privacy.py's round summary)."""
        privacy = (self.summary or {}).get("privacy")
        epsilon = privacy.get("epsilon") if isinstance(privacy, dict) else None
        return epsilon if isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool) else None

    def as_dict(self) -> dict[str, Any]:
        summary = self.summary or {}
        return {
            "round": self.round,
            "state": "finished" if self.summary is not None else "running",
            "started": self.started,
            "finished": self.finished,
            "sampled": summary.get("sampled", self.sampled),
            "attempts": summary.get("attempts", self.attempts),
            # while the round runs, its replies so far; once it is finished, the summary's verdict
            "accepted": summary.get("accepted", [r["org"] for r in self.replies if r["accepted"]]),
            "rejected": summary.get("rejected", [{"org": r["org"], "reason": "", "detail": r["detail"]}
                                                 for r in self.replies if not r["accepted"]]),
            "timed_out": summary.get("timed_out", []),
            "eval_rejected": summary.get("eval_rejected", []),
            "train_loss": summary.get("train_loss"),
            "train_seconds": summary.get("train_seconds"),
            "eval_seconds": summary.get("eval_seconds"),
            "eval": summary.get("eval", {}),
            "eval_overall": summary.get("eval_overall", {}),
            "epsilon": self.epsilon,
            "bytes": _total(summary.get("bytes")),   # down + up this round; None: not counted
            "replies": self.replies,
        }


def rounds_from_events(events: list[Event]) -> tuple[list[RoundRow], int | None]:
    """The rounds in order, and the current round: that of the last ``round_started`` (round 0,
    the base model's evaluation, has none: then the last round seen).

    A round that starts again (a retry below quorum, or a resumed job re-running the round the
    coordinator died in) starts its row afresh: its later events are the ones that count."""
    rows: dict[int, RoundRow] = {}
    current: int | None = None
    for event in events:
        number = event.get("round")
        if not isinstance(number, int) or isinstance(number, bool):
            continue
        kind = event["event"]
        if kind == ROUND_STARTED:
            previous = rows.get(number)
            sampled = event.get("sampled")
            rows[number] = RoundRow(number, started=_text(event.get("time")),
                                    sampled=sampled if isinstance(sampled, int) else None,
                                    attempts=(previous.attempts if previous and previous.summary is None else 0) + 1)
            current = number
        elif kind == REPLY:
            row = rows.setdefault(number, RoundRow(number))
            row.replies.append({"org": _text(event.get("org")), "accepted": event.get("accepted") is True,
                                "detail": _text(event.get("detail")), "time": _text(event.get("time"))})
        elif kind == ROUND_FINISHED:
            row = rows.setdefault(number, RoundRow(number))
            summary = event.get("summary")
            row.summary = summary if isinstance(summary, dict) else {}
            row.finished = _text(event.get("time"))
    if current is None and rows:
        current = max(rows)
    return [rows[n] for n in sorted(rows)], current


def curves(rows: list[RoundRow]) -> dict[str, Any]:
    """Per organization, each evaluation metric per round: ``{metric: {org: [[round, value], ...]}}``,
    plus the overall one under ``overall``."""
    per_org: dict[str, dict[str, list[list[float]]]] = {}
    overall: dict[str, list[list[float]]] = {}
    for row in rows:
        summary = row.summary or {}
        evaluations = summary.get("eval") if isinstance(summary.get("eval"), dict) else {}
        for org, metrics in evaluations.items():
            for name, value in _numbers(metrics):
                per_org.setdefault(name, {}).setdefault(str(org), []).append([row.round, value])
        for name, value in _numbers(summary.get("eval_overall")):
            overall.setdefault(name, []).append([row.round, value])
    return {"organizations": per_org, "overall": overall}


def _numbers(metrics: Any) -> Iterable[tuple[str, float]]:
    if not isinstance(metrics, dict):
        return []
    return [(str(k), float(v)) for k, v in metrics.items()
            if k not in NOT_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)]


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


# ---- the views the API returns ----------------------------------------------------

def _spec(row: dict[str, Any]) -> dict[str, Any]:
    try:
        spec = json.loads(row.get("spec_json") or "{}")
    except (TypeError, ValueError):
        return {}
    return spec if isinstance(spec, dict) else {}


def _setting(spec: dict[str, Any], name: str) -> Any:
    """A job setting from the job's spec, whichever spelling it uses (``num_rounds`` / ``num-rounds``),
    at the top or under ``settings``/``config``."""
    for scope in (spec, spec.get("settings"), spec.get("config"), spec.get("run_config")):
        if isinstance(scope, dict):
            for key in (name, name.replace("_", "-")):
                if key in scope:
                    return scope[key]
    return None


def _events_path(row: dict[str, Any]) -> Path | None:
    run_dir = row.get("run_dir")
    return Path(run_dir) / EVENTS_FILE if run_dir else None


def _job_summary(row: dict[str, Any], rows: list[RoundRow], current: int | None) -> dict[str, Any]:
    spec = _spec(row)
    finished = [r for r in rows if r.summary is not None]
    epsilon = next((r.epsilon for r in reversed(finished) if r.epsilon is not None), None)
    return {
        "id": row.get("id"),
        "specialist": row.get("specialist"),
        "specialist_version": row.get("specialist_version"),
        "state": row.get("state"),
        "created_at": row.get("created_at"),
        "started_at": row.get("started_at"),
        "finished_at": row.get("finished_at"),
        "error": row.get("error"),
        "continue_from": row.get("continue_from"),
        "strategy": _setting(spec, "strategy"),
        "metric": _setting(spec, "metric"),
        "num_rounds": _setting(spec, "num_rounds"),
        "current_round": current,
        "rounds_finished": max((r.round for r in finished), default=None),
        "epsilon": epsilon,
        "bytes": _job_bytes(finished),
    }


def _total(moved: object) -> int | None:
    """A round's bytes (server/traffic.py: ``{"down", "up"}``) as one number; None when not counted."""
    if not isinstance(moved, dict):
        return None
    try:
        return int(moved["down"]) + int(moved["up"])
    except (KeyError, TypeError, ValueError):
        return None


def _job_bytes(finished: list[RoundRow]) -> int | None:
    counted = [_total((r.summary or {}).get("bytes")) for r in finished]
    return sum(c for c in counted if c is not None) if any(c is not None for c in counted) else None


class DashboardData:
    """The dashboard's reads of ``state_dir``. An events file is parsed again only when it has
    changed (size or modification time), so a page polling every two seconds costs a ``stat``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self._parsed: dict[Path, tuple[tuple[int, int], list[RoundRow], int | None]] = {}

    def _rounds(self, row: dict[str, Any]) -> tuple[list[RoundRow], int | None]:
        path = _events_path(row)
        if path is None:
            return [], None
        try:
            stat = path.stat()
        except OSError:
            return [], None
        key = (stat.st_size, stat.st_mtime_ns)
        cached = self._parsed.get(path)
        if cached is None or cached[0] != key:
            cached = (key, *rounds_from_events(read_events(path)))
            self._parsed[path] = cached
        return cached[1], cached[2]

    def jobs(self) -> list[dict[str, Any]]:
        return [_job_summary(row, *self._rounds(row)) for row in read_jobs(self.state_dir)]

    def job(self, job_id: str) -> dict[str, Any] | None:
        row = next((r for r in read_jobs(self.state_dir) if r.get("id") == job_id), None)
        if row is None:
            return None
        rows, current = self._rounds(row)
        metric = METRIC_KEYS.get(str(_setting(_spec(row), "metric") or ""), "")
        found = curves(rows)
        if metric not in found["organizations"]:
            # the job's own metric when the organizations report it, else accuracy, else loss
            metric = next((m for m in ("accuracy", "loss") if m in found["organizations"]),
                          next(iter(found["organizations"]), ""))
        return {
            "job": _job_summary(row, rows, current),
            "rounds": [r.as_dict() for r in rows],
            "current_round": current,
            "curves": found,
            "curve_metric": metric,
            "not_recorded": NOT_RECORDED,
        }

    def specialists(self) -> list[dict[str, Any]]:
        return read_specialists(self.state_dir)
