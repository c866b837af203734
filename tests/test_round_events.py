"""The round loop's events file (server/events.py) and the per-round view built on it
(server/cli/round_table.py): what `silotune simulate` prints and `silotune coordinator`
follows while a deployed job runs."""

from __future__ import annotations

import io
import json
import logging
import math
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from server.cli.round_table import render_event, round_table
from server.events import EVENTS_FILE, EventsFile, EventsFollower, json_safe, read_events
from test_round_loop import ScriptedGrid, config, honest

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = "\x1b[31m[red]x[/red] [link=http://x]y\nround 9: forged line"


def strict_lines(path: Path) -> list[dict]:
    """Each line parsed on its own, refusing NaN/Infinity (not JSON)."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text(encoding="ascii").splitlines()]


def rendered(renderables: list) -> str:
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    for renderable in renderables:
        console.print(renderable)
    return out.getvalue()


def wait_for(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_each_event_is_one_json_line_in_the_order_it_happened(tmp_path: Path) -> None:
    events = EventsFile(tmp_path / "run" / EVENTS_FILE, "job-7")
    events.round_finished(0, {"round": 0, "eval": {"a": {"num_examples": 4.0, "accuracy": 0.5}}, "eval_rejected": []})
    events.round_started(1, 2)
    events.reply(1, "a", True, "n=10 |Δ|=0.1")
    events.reply(1, "b", False, "too-large: 9 bytes")
    events.round_finished(1, {"round": 1, "sampled": 2, "train_loss": math.nan, "weight": np.int64(3),
                              "rejected": [{"org": "b", "reason": "too-large", "detail": "9 bytes"}],
                              "eval": {"a": {"num_examples": 4.0, "accuracy": 0.75}}, "timed_out": ()})

    lines = strict_lines(tmp_path / "run" / EVENTS_FILE)
    assert [(e["event"], e["round"]) for e in lines] == [
        ("round_finished", 0), ("round_started", 1), ("reply", 1), ("reply", 1), ("round_finished", 1)]
    assert all(e["job_id"] == "job-7" for e in lines)
    times = [datetime.fromisoformat(e["time"]) for e in lines]
    assert all(t.tzinfo is not None and t.utcoffset() == timezone.utc.utcoffset(None) for t in times)
    assert times == sorted(times)
    assert lines[1]["sampled"] == 2
    assert lines[2] | {"time": None} == {"event": "reply", "time": None, "job_id": "job-7", "round": 1, "org": "a",
                                         "accepted": True, "detail": "n=10 |Δ|=0.1"}
    assert lines[3]["accepted"] is False and lines[3]["detail"] == "too-large: 9 bytes"
    summary = lines[4]["summary"]
    assert summary["train_loss"] is None and summary["weight"] == 3 and summary["timed_out"] == []
    assert summary["eval"]["a"]["accuracy"] == 0.75 and summary["rejected"][0]["reason"] == "too-large"
    assert read_events(tmp_path / "run" / EVENTS_FILE) == lines


def test_a_hostile_organization_name_is_stored_as_data_and_printed_as_text(tmp_path: Path) -> None:
    path = tmp_path / EVENTS_FILE
    events = EventsFile(path, "j")
    events.round_started(1, 1)
    events.reply(1, HOSTILE, False, "client-error: boom [/] \x1b[2J\nforged")
    events.round_finished(1, {"round": 1, "sampled": 1, "accepted": [], "rejected": [], "timed_out": [HOSTILE],
                              "eval": {HOSTILE: {"num_examples": 4.0, "accuracy": 0.5, "perplexity": 2.0}},
                              "eval_overall": {"num_examples": 4.0},
                              "eval_rejected": [{"org": HOSTILE, "reason": "bad", "detail": "[bold]\nx"}]})

    assert path.read_bytes().isascii() and len(path.read_bytes().splitlines()) == 3   # one line per event
    stored = read_events(path)
    assert stored[1]["org"] == HOSTILE and stored[2]["summary"]["eval"] == {
        HOSTILE: {"num_examples": 4.0, "accuracy": 0.5, "perplexity": 2.0}}

    printed = rendered([r for event in stored for r in render_event(event)])
    assert "\x1b" not in printed
    assert "[red]x[/red] [link=http://x]y" in printed                      # as sent, not styled
    assert "\\x1b[31m" in printed and "\\nround 9: forged line" in printed  # escaped, on the same line
    assert not any(line.startswith("round 9") for line in printed.splitlines())
    assert "boom [/] \\x1b[2J\\nforged" in printed and "[bold]\\nx" in printed


def test_a_resumed_job_appends_after_a_half_written_line(tmp_path: Path) -> None:
    path = tmp_path / EVENTS_FILE
    EventsFile(path, "j").round_started(1, 2)
    with open(path, "ab") as f:          # the coordinator died in the middle of a line
        f.write(b'{"event": "reply", "round": 1, "org": "ba')
    resumed = EventsFile(path, "j")
    resumed.round_started(1, 2)
    resumed.reply(1, "bank-a", True, "n=1")
    assert [(e["event"], e["round"]) for e in read_events(path)] == [
        ("round_started", 1), ("round_started", 1), ("reply", 1)]
    assert path.read_bytes().startswith(b'{"event": "round_started"')   # the first run's line is still there


def test_the_follower_hands_on_a_line_only_once_its_newline_is_written(tmp_path: Path) -> None:
    path = tmp_path / EVENTS_FILE
    seen: list[dict] = []
    follower = EventsFollower(path, seen.append, poll=0.01)   # the file does not exist yet
    try:
        line = json.dumps({"event": "round_started", "round": 1, "sampled": 2}).encode() + b"\n"
        with open(path, "ab", buffering=0) as f:
            f.write(line[:17])
            time.sleep(0.2)
            assert seen == []
            f.write(line[17:] + line[:5])
            wait_for(lambda: len(seen) == 1)
            f.write(line[5:])
            wait_for(lambda: len(seen) == 2)
            f.write(b"not json\n" + line)
            wait_for(lambda: len(seen) == 3)
    finally:
        follower.stop()
    assert seen == [{"event": "round_started", "round": 1, "sampled": 2}] * 3


def test_the_follower_reads_what_another_thread_writes_as_it_is_written(tmp_path: Path) -> None:
    path = tmp_path / EVENTS_FILE
    seen: list[dict] = []
    follower = EventsFollower(path, seen.append, poll=0.01)
    events = EventsFile(path, "j")
    progress = []

    def write() -> None:
        for k in range(1, 4):
            events.round_started(k, 2)
            wait_for(lambda: len(seen) == k)   # the follower has it before the next one is written
            progress.append(k)

    writer = threading.Thread(target=write)
    writer.start()
    writer.join(timeout=20)
    follower.stop()
    assert progress == [1, 2, 3] and [e["round"] for e in seen] == [1, 2, 3]


def test_the_follower_reads_another_process_and_skips_what_was_there_before(tmp_path: Path) -> None:
    path = tmp_path / EVENTS_FILE
    EventsFile(path, "old").round_started(1, 2)   # an earlier run in the same run dir
    seen: list[dict] = []
    follower = EventsFollower(path, seen.append, poll=0.05)
    assert not follower.grown()
    script = ("import sys, time; sys.path[:0] = [sys.argv[1]]\n"
              "from server.events import EventsFile\n"
              "events = EventsFile(sys.argv[2], 'new')\n"
              "for k in (2, 3):\n"
              "    events.round_started(k, 2); time.sleep(0.2)\n")
    subprocess.run([sys.executable, "-c", script, str(ROOT), str(path)], check=True, timeout=120)
    assert follower.grown()   # what the coordinator asks before leaving out the log's round lines
    follower.stop()   # reads what is left
    assert [(e["job_id"], e["round"]) for e in seen] == [("new", 2), ("new", 3)]


def test_a_job_writes_its_rounds_and_the_same_numbers_as_its_report(tmp_path: Path) -> None:
    from server.app import run_job

    grid = ScriptedGrid({1: honest(0.1, name="bank-a", eval_metrics={"num_examples": 4.0, "loss": 1.5,
                                                                     "accuracy": 0.25}),
                         2: honest(0.2, name="bank-b")})
    run_job(grid, config(tmp_path, num_rounds=1))
    run_job(grid, config(tmp_path, num_rounds=2))   # resumed after round 1: appends round 2

    events = strict_lines(tmp_path / EVENTS_FILE)
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(e["event"], e["round"]) for e in events] == [
        ("round_finished", 0),
        ("round_started", 1), ("reply", 1), ("reply", 1), ("round_finished", 1),
        ("round_started", 2), ("reply", 2), ("reply", 2), ("round_finished", 2)]
    assert sorted(e["org"] for e in events if e["event"] == "reply") == ["bank-a", "bank-a", "bank-b", "bank-b"]
    assert all(e["accepted"] for e in events if e["event"] == "reply")
    finished = [e["summary"] for e in events if e["event"] == "round_finished"]
    assert [s["round"] for s in finished] == [h["round"] for h in report["history"]] == [0, 1, 2]
    for summary, history in zip(finished, report["history"]):
        # the whole round as the report has it (NaN as null), but for what is added after the evaluation
        assert summary == json_safe({k: v for k, v in history.items() if k != "late_replies"})
    assert finished[2]["eval"]["bank-a"] == {"num_examples": 4.0, "loss": 1.5, "accuracy": 0.25}


def test_the_round_table_shows_optional_metrics_only_when_an_organization_reports_them() -> None:
    plain_summary = {"round": 1, "sampled": 2, "accepted": ["a", "b"], "rejected": [], "train_loss": 1.25,
                     "train_seconds": 3.0, "eval_seconds": 1.0,
                     "eval": {"a": {"num_examples": 4.0, "accuracy": 0.5, "perplexity": 2.0}},
                     "eval_overall": {"num_examples": 4.0, "accuracy": 0.5, "perplexity": 2.0}}
    text = rendered([round_table(1, plain_summary).table])
    assert "round 1 done — 2 sampled, 2 accepted, 0 rejected — train 3s, loss 1.250 — eval 1s" in text
    for column in ("local-only", "macro F1", "exact match"):
        assert column not in text

    richer = json.loads(json.dumps(plain_summary))
    richer["eval"]["a"].update(local_accuracy=0.125, local_perplexity=7.5, macro_f1=0.375)
    richer["eval"]["b"] = {"num_examples": 2.0, "accuracy": 1.0, "perplexity": 1.5, "exact_match": 0.5}
    text = rendered([round_table(1, richer).table])
    header = next(line for line in text.splitlines() if "organization" in line)
    assert [c for c in ("accuracy", "macro F1", "exact match", "perplexity", "local-only acc", "local-only ppl")
            if c in header] == ["accuracy", "macro F1", "exact match", "perplexity", "local-only acc",
                                "local-only ppl"]
    assert header.index("macro F1") < header.index("perplexity") < header.index("local-only acc")
    row_a = next(line for line in text.splitlines() if line.startswith("│ a "))
    for cell in ("0.500", "0.375", "2.00", "0.125", "7.50"):
        assert cell in row_a
    row_b = next(line for line in text.splitlines() if line.startswith("│ b "))
    assert "0.500" in row_b and row_b.count("—") == 3   # no macro F1, no local-only metrics


def test_the_coordinator_leaves_out_only_the_log_lines_its_tables_show(monkeypatch: pytest.MonkeyPatch) -> None:
    """The round log's lines (server/job.py's LogObserver, in the ServerApp's log format) that the
    events show are not relayed twice; warnings always are, whatever a name says."""
    from server.cli import coordinator
    from server.job import LogObserver

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Collect()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("silotune.server")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        observer = LogObserver()
        observer.round_started(1, 2)
        observer.reply(1, "bank-a", True, "n=10 |Δ|=0.1")
        observer.reply(1, "accepted ", False, "accepted n=1 REJECTED")
        observer.round_finished(1, {"round": 1, "train_loss": 1.0})
        logger.warning("round 1: 1 valid update(s), quorum is 2 (rejected: [{'org': 'x accepted y'}])")
        logger.info("resuming job j after round 1 from /x")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert len(records) == 6

    out = io.StringIO()
    monkeypatch.setattr(coordinator, "console", Console(file=out, width=300, color_system=None))
    for line in records:
        coordinator.relay_log_line(line, tables_shown=True)
    relayed = out.getvalue().splitlines()
    assert [line.strip() for line in relayed] == [records[2], records[4], records[5]]

    out.truncate(0), out.seek(0)
    for line in records:   # until the events file shows something, everything is relayed
        coordinator.relay_log_line(line, tables_shown=False)
    assert [line.strip() for line in out.getvalue().splitlines()] == records
