"""The round loop's events as a file: ``<run-dir>/events.jsonl``, one JSON object a line.

Every job writes it (``server/app.py``'s ``run_job``), in a simulation as in a
deployment, next to its checkpoints and report; `silotune coordinator`
follows it to print the rounds as they happen. Each line is one event::

    {"event": "round_started", "time": "2025-01-01T12:00:00.000000+00:00", "job_id": "j", "round": 1, "sampled": 2}
    {"event": "reply", ..., "round": 1, "org": "bank-a", "accepted": true, "detail": "n=40 |Δ|=0.01"}
    {"event": "round_finished", ..., "round": 1, "summary": {"train_loss": ..., "eval": {...}, ...}}

``summary`` is the round's entry of the job's history as the round loop hands it over
(``server/job.py``): round 0 (the base model) has a ``round_finished`` and no
``round_started``; a retried round has one ``round_started`` per attempt. Numbers that
are not finite are ``null`` (strict JSON, so any reader takes it); anything else that
JSON cannot hold is written as its ``str``.

Organization names and details came from the network: they are stored as JSON
strings (escaped, ASCII), never interpreted; whoever prints them escapes them
(``server/cli/round_table.py``).

Durability: each event is flushed and fsync'd before the round loop goes on, so a
follower sees it at once and a crash loses at most the line being written. A job that
resumes (server/checkpoint.py) appends; a round that was under way when the coordinator
died is then in the file twice, and its later events are the ones that count.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from server.job import RoundObserver

log = logging.getLogger("silotune.server")

EVENTS_FILE = "events.jsonl"
ROUND_STARTED = "round_started"
REPLY = "reply"
ROUND_FINISHED = "round_finished"

Event = dict[str, Any]


class EventsFile:
    """A RoundObserver that appends each event to ``path`` (see the module's docstring)."""

    def __init__(self, path: Path | str, job_id: str) -> None:
        self.path = Path(path)
        self.job_id = job_id
        self._lock = threading.Lock()   # one line at a time, whichever thread reports
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._end_partial_line()

    def round_started(self, server_round: int, sampled: int) -> None:
        self._write(ROUND_STARTED, round=server_round, sampled=sampled)

    def reply(self, server_round: int, org: str, accepted: bool, detail: str) -> None:
        self._write(REPLY, round=server_round, org=org, accepted=bool(accepted), detail=detail)

    def round_finished(self, server_round: int, summary: dict[str, Any]) -> None:
        self._write(ROUND_FINISHED, round=server_round, summary=summary)

    def _write(self, kind: str, **fields: Any) -> None:
        event = {"event": kind, "time": datetime.now(timezone.utc).isoformat(), "job_id": self.job_id, **fields}
        line = json.dumps(json_safe(event), ensure_ascii=True, allow_nan=False) + "\n"
        with self._lock:
            self._append(line.encode("ascii"))

    def _append(self, data: bytes) -> None:
        # O_APPEND: every write lands at the end, even if a previous run left the file longer
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _end_partial_line(self) -> None:
        """A crash mid-write may have left half a line: end it, so that this run's first
        event is a line of its own (a reader skips the broken one)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() == 0:
                    return
                f.seek(-1, os.SEEK_END)
                if f.read(1) == b"\n":
                    return
        except FileNotFoundError:
            return
        self._append(b"\n")


class TeeObserver:
    """A RoundObserver that hands each event to several, in order."""

    def __init__(self, *observers: RoundObserver) -> None:
        self.observers = observers

    def round_started(self, server_round: int, sampled: int) -> None:
        for observer in self.observers:
            observer.round_started(server_round, sampled)

    def reply(self, server_round: int, org: str, accepted: bool, detail: str) -> None:
        for observer in self.observers:
            observer.reply(server_round, org, accepted, detail)

    def round_finished(self, server_round: int, summary: dict[str, Any]) -> None:
        for observer in self.observers:
            observer.round_finished(server_round, summary)


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON can hold it: non-finite floats → None, tuples → lists,
    mapping keys → str, numpy scalars → Python numbers, anything else → its str."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    item = getattr(value, "item", None)   # numpy scalars
    if callable(item):
        try:
            return json_safe(item())
        except (TypeError, ValueError):
            pass
    return str(value)


# ---- reading -----------------------------------------------------------------------

def read_events(path: Path | str) -> list[Event]:
    """Every complete, well-formed event in the file (a broken or unfinished line is skipped)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")[:-1]   # what follows the last newline is not written yet
    return list(_decode(lines))


def _decode(lines: list[bytes]) -> Iterator[Event]:
    for raw in lines:
        if not raw.strip():
            continue
        try:
            event = json.loads(raw.decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            log.debug("skipping a broken line of an events file: %r", raw[:200])
            continue
        if isinstance(event, dict) and isinstance(event.get("event"), str):
            yield event


class EventsFollower:
    """Hands each event appended to ``path`` to ``on_event``, from a thread, as it is written.

    It reads what was added since its last look every ``poll`` seconds (the writer is
    another process, so there is nothing to wait on but the file); a line is handed on
    once its newline is there. It starts at the file's end as it is when constructed:
    events of an earlier run in the same run dir are not repeated. ``stop()`` reads
    what is left, then ends the thread.
    """

    def __init__(self, path: Path | str, on_event: Callable[[Event], None], *, poll: float = 0.5,
                 from_start: bool = False) -> None:
        self.path = Path(path)
        self.on_event = on_event
        self.poll = poll
        self._offset = self._start = 0 if from_start else _size(self.path)
        self._grown = False
        self._partial = b""
        self._stop = threading.Event()
        self._lock = threading.Lock()   # stop()'s last read and the thread's never overlap
        self._thread = threading.Thread(target=self._run, name="events-follower", daemon=True)
        self._thread.start()

    def grown(self) -> bool:
        """Whether anything was written to the file since this follower began: every such
        event is, or soon will be, handed on."""
        self._grown = self._grown or _size(self.path) > self._start
        return self._grown

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            self._read()

    def _read(self) -> None:
        with self._lock:
            size = _size(self.path)
            if size < self._offset:   # replaced by a shorter file: read it from its start
                self._offset, self._partial = 0, b""
            if size == self._offset:
                return
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read(size - self._offset)
            self._offset += len(chunk)
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            for event in _decode(lines):
                try:
                    self.on_event(event)
                except Exception:  # a display problem must not end the following
                    log.exception("could not show a round event")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10.0)
        self._read()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
