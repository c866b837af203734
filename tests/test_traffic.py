"""Bytes moved: every instruction and reply of a job counted once, per round and in total."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.traffic import CountingGrid, bytes_moved
from server.validation import reply_bytes

TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # as tests/test_validation.py


class _Grid:
    """Push stores; pull answers every id with a reply of 3 float32s, plus one error reply."""

    def __init__(self) -> None:
        self.pushed: list[Message] = []

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        self.pushed += messages
        return [f"id-{i}" for i in range(len(messages))]

    def pull_messages(self, ids):  # type: ignore[no-untyped-def]
        content = RecordDict({"a": ArrayRecord({"x": Array(np.ones(3, dtype=np.float32))}),
                              "m": MetricRecord({"loss": 1.0})})
        replies = [Message(content, reply_to=self.pushed[0]) for _ in ids]
        return replies + [Message(Error(0, "boom"), reply_to=self.pushed[0])]

    def get_node_ids(self) -> list[int]:
        return [1, 2]


def test_pushed_and_pulled_contents_are_counted_and_taken_per_round() -> None:
    grid = CountingGrid(_Grid())
    content = RecordDict({"g": ArrayRecord({"w": Array(np.zeros((4, 4), dtype=np.float32))}),
                          "c": ConfigRecord({"job": "x"})})
    messages = [Message(content, dst_node_id=n, message_type="train") for n in (1, 2)]
    grid.push_messages(messages)
    replies = list(grid.pull_messages(["id-0", "id-1"]))
    assert grid.get_node_ids() == [1, 2]  # everything else passes through
    one_reply = reply_bytes(replies[0].content)
    assert grid.take() == {"down": 2 * reply_bytes(content), "up": 2 * one_reply}  # the error reply carries none
    assert reply_bytes(content) >= 64 and one_reply >= 12
    assert grid.take() == {"down": 0, "up": 0}
    history = [{"round": 0, "bytes": {"down": 10, "up": 4}}, {"round": 1, "bytes": {"down": 5, "up": 1}}, {"round": 2}]
    assert bytes_moved(history) == {"down": 15, "up": 5, "total": 20}


def test_every_round_of_a_job_says_what_it_moved(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from test_round_loop import ScriptedGrid, config, honest

    from server.job import Job

    grid = ScriptedGrid({1: honest(0.1), 2: honest(0.2)})
    job = Job(grid, config(tmp_path, num_rounds=2))
    history = job.run().run_state["history"]
    fp32 = sum(4 * int(np.prod(shape)) for shape in job.layout.values())
    assert [h["round"] for h in history] == [0, 1, 2]
    for entry in history:
        # every round: one evaluate instruction per organization (the global adapter, fp32), and
        # in rounds 1-2 one train instruction each too; the replies: updates (training) and metrics
        instructions = 2 if entry["round"] == 0 else 4
        assert instructions * fp32 <= entry["bytes"]["down"] < instructions * (fp32 + 4096), entry
        up = entry["bytes"]["up"]
        assert (up < 4096) if entry["round"] == 0 else (2 * fp32 <= up < 2 * (fp32 + 4096)), entry
    assert bytes_moved(history)["total"] == sum(h["bytes"]["down"] + h["bytes"]["up"] for h in history)


def test_the_report_names_the_metric_the_job_led_with(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from test_round_loop import config

    from server.app import headline_metric

    classified = [{"eval": {"a": {"accuracy": 0.5, "loss": 1.0}}}]
    generated = [{"eval": {"a": {"loss": 1.0}}}]
    assert headline_metric(config(tmp_path), classified) == "accuracy"
    assert headline_metric(config(tmp_path), generated) == "perplexity"
    assert headline_metric(config(tmp_path, metric="macro-f1"), classified) == "macro-f1"


def test_a_communication_budget_stops_the_job_before_the_round_that_would_pass_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from test_round_loop import ScriptedGrid, config, honest

    from server.job import Job
    from server.traffic import next_round_estimate

    free = Job(ScriptedGrid({1: honest(0.1), 2: honest(0.2)}), config(tmp_path / "free", num_rounds=3))
    history = free.run().run_state["history"]
    totals = [h["bytes"]["down"] + h["bytes"]["up"] for h in history]
    assert totals[1] == totals[2] == totals[3]                 # every trained round moves the same
    assert next_round_estimate(history[:1]) >= totals[1]       # before any: 3 x round 0's, not less
    # room for round 0 and one trained round, not two: the job stops before round 2, cleanly
    budget = (totals[0] + 3 * totals[0] + totals[1] // 2) / 1e6
    job = Job(ScriptedGrid({1: honest(0.1), 2: honest(0.2)}), config(tmp_path / "capped", num_rounds=3,
                                                                     comm_budget_mb=budget))
    final = job.run()
    assert final.round == 1 and [h["round"] for h in final.run_state["history"]] == [0, 1]
    assert job.stop_reason and "communication budget: round 2 would move" in job.stop_reason
    assert bytes_moved(final.run_state["history"])["total"] <= budget * 1e6


def test_a_negative_budget_is_refused_by_name() -> None:
    import pytest

    from server.job_config import JobConfig, JobConfigError

    with pytest.raises(JobConfigError, match="comm-budget-mb"):
        JobConfig.from_run_config({"comm-budget-mb": -1})
