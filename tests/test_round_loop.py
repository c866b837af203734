"""The coordinator's round loop against an in-memory, scripted Grid (no Ray, fast).

Scripted organizations answer each instruction: honest ones return the global
plus a known delta; others send what attackers and broken agents send. The
scripted grid builds a reply only when the coordinator pulls it — as a real
SuperLink holds replies in another process — so the coordinator's own memory
can be measured.
"""

from __future__ import annotations

import itertools
import json
import time
import tracemalloc
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from flwr.app import Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from protos import codec
from protos.round_config import CONFIG_RECORD, RoundConfig
from server.checkpoint import CheckpointStore
from server.exchange import QuorumError
from server.job import Job
from server.job_config import JobConfig

Handler = Callable[[Message], Message]


class ScriptedGrid(Grid):
    """A Grid whose nodes are Python callables; replies are made when pulled."""

    def __init__(self, handlers: dict[int, Handler], delays: dict[int, float] | None = None) -> None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.handlers = handlers
        self.delays = delays or {}
        self._pending: dict[str, tuple[Message, float]] = {}
        self._ids = itertools.count()
        self.largest_pull = 0

    def set_run(self, run):  # type: ignore[no-untyped-def]
        pass

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self):  # type: ignore[no-untyped-def]
        return list(self.handlers)

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        ids = []
        for message in messages:
            message_id = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = message_id
            self._pending[message_id] = (message, time.monotonic())
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        replies = []
        for message_id in message_ids:
            message, pushed = self._pending.get(message_id, (None, 0.0))
            node = message.metadata.dst_node_id if message else None
            if message is None or time.monotonic() - pushed < self.delays.get(node, 0.0):
                continue
            del self._pending[message_id]
            replies.append(self.handlers[node](message))
        self.largest_pull = max(self.largest_pull, len(replies))
        return replies

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError("silotune never waits for all replies")


def honest(delta: float, num_examples: int = 10, **overrides: object) -> Handler:
    """Replies with global + delta (or evaluation metrics)."""

    def handle(message: Message) -> Message:
        cfg = RoundConfig.from_record(message.content.config_records[CONFIG_RECORD])
        header, global_adapter = codec.decode(message.content)
        if message.metadata.message_type == "evaluate":
            from flwr.app import ConfigRecord, MetricRecord

            return Message(RecordDict({"metrics": MetricRecord({"num_examples": 4.0, "loss": 1.0, "accuracy": 0.5}),
                                       "organization": ConfigRecord({"name": f"org-{delta}"})}), reply_to=message)
        update = {k: v + np.float32(delta) for k, v in global_adapter.items()}
        fields = dict(kind=codec.Kind.Value("UPDATE"), job_id=cfg.job_id, server_round=cfg.server_round,
                      fingerprint=header.base_model_fingerprint, lora=cfg.lora, num_examples=num_examples)
        fields.update(overrides)
        return Message(codec.encode(update, **fields), reply_to=message)

    return handle


def poisoned(value: float) -> Handler:
    def handle(message: Message) -> Message:
        if message.metadata.message_type == "evaluate":
            return honest(0.0)(message)
        cfg = RoundConfig.from_record(message.content.config_records[CONFIG_RECORD])
        header, global_adapter = codec.decode(message.content)
        update = {k: np.full_like(v, value) for k, v in global_adapter.items()}
        return Message(codec.encode(update, kind=codec.Kind.Value("UPDATE"), job_id=cfg.job_id,
                                    server_round=cfg.server_round, fingerprint=header.base_model_fingerprint,
                                    lora=cfg.lora, num_examples=10), reply_to=message)
    return handle


def failing(message: Message) -> Message:
    if message.metadata.message_type == "evaluate":
        return honest(0.0)(message)
    return Message(Error(code=1, reason="SiloNoRows: no rows left after filtering"), reply_to=message)


def config(tmp_path: Path, **settings: object) -> JobConfig:
    base = dict(model="tiny-llama", job_id="loop", num_rounds=1, min_nodes=2, round_timeout=5.0,
                node_wait_timeout=2.0, poll_interval=0.01, run_dir=str(tmp_path), lora_r=4)
    base.update(settings)
    return JobConfig(**base)  # type: ignore[arg-type]


def test_bad_updates_are_rejected_by_name_and_the_round_goes_on(tmp_path: Path) -> None:
    grid = ScriptedGrid({
        1: honest(0.1), 2: honest(0.3),
        3: honest(0.2, fingerprint="blake2b:another-base-model"),
        4: poisoned(float("nan")),
        5: honest(0.2, server_round=7),
        6: failing,
    })
    cfg = config(tmp_path, min_nodes=6, min_replies=2)
    job = Job(grid, cfg)
    start = job._resume_or_init().adapter
    final = job.run()
    summary = final.run_state["history"][-1]
    reasons = sorted(r["reason"] for r in summary["rejected"])
    assert reasons == ["base_model_mismatch", "client_error", "non_finite", "wrong_round"]
    assert len(summary["accepted"]) == 2
    for name, value in final.adapter.items():  # the mean of the two honest updates, nothing else
        np.testing.assert_allclose(value, start[name] + 0.2, atol=1e-6)


def test_a_straggler_past_the_deadline_is_dropped(tmp_path: Path) -> None:
    grid = ScriptedGrid({1: honest(0.1), 2: honest(0.3), 3: honest(5.0)}, delays={3: 60.0})
    cfg = config(tmp_path, min_nodes=3, min_replies=2, round_timeout=1.0)
    job = Job(grid, cfg)
    start = job._resume_or_init().adapter
    started = time.monotonic()
    final = job.run()
    assert time.monotonic() - started < 10, "the deadline was not enforced"
    summary = final.run_state["history"][-1]
    assert len(summary["timed_out"]) == 1 and len(summary["accepted"]) == 2
    for name, value in final.adapter.items():
        np.testing.assert_allclose(value, start[name] + 0.2, atol=1e-6)


def test_below_quorum_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    grid = ScriptedGrid({1: honest(0.1), 2: failing, 3: failing})
    cfg = config(tmp_path, min_nodes=3, num_rounds=2)
    with pytest.raises(QuorumError, match="quorum is 3"):
        Job(grid, cfg).run()
    assert CheckpointStore(cfg.checkpoint_dir).rounds() == [0]


def test_too_few_organizations_online_never_hangs(tmp_path: Path) -> None:
    grid = ScriptedGrid({1: honest(0.1)})
    started = time.monotonic()
    with pytest.raises(QuorumError, match="only 1 organization"):
        Job(grid, config(tmp_path, min_nodes=3, node_wait_timeout=1.0)).run()
    assert time.monotonic() - started < 10


def _peak_bytes_for(replies: int, tmp_path: Path) -> tuple[int, int]:
    grid = ScriptedGrid({node: honest(0.01 * node) for node in range(1, replies + 1)})
    cfg = config(tmp_path / f"n{replies}", min_nodes=replies, lora_r=256)
    job = Job(grid, cfg)
    state = job._resume_or_init()
    update_bytes = sum(v.nbytes for v in state.adapter.values())
    tracemalloc.start()
    job._train(state, 1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert grid.largest_pull <= 4
    return peak, update_bytes


def test_coordinator_memory_does_not_grow_with_the_number_of_replies(tmp_path: Path) -> None:
    """DESIGN invariant: memory for updates is O(P), not O(N·P)."""
    few, update_bytes = _peak_bytes_for(4, tmp_path)
    many, _ = _peak_bytes_for(48, tmp_path)
    assert update_bytes > 400_000  # big enough to see
    # 44 more replies, each of update_bytes: holding them would add ~44× update_bytes
    assert many - few < 3 * update_bytes, (few, many, update_bytes)


def test_history_is_json_and_names_organizations(tmp_path: Path) -> None:
    grid = ScriptedGrid({1: honest(0.1), 2: honest(0.2)})
    final = Job(grid, config(tmp_path)).run()
    history = json.loads(json.dumps(final.run_state["history"]))
    assert [h["round"] for h in history] == [0, 1]
