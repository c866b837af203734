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
import math
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


def honest(delta: float, num_examples: int = 10, *, eval_metrics: dict[str, float] | None = None,
           name: str | None = None, **overrides: object) -> Handler:
    """Replies with global + delta (or evaluation metrics, by default 4 examples, loss 1, accuracy 0.5,
    and the organization's name, by default org-<delta>)."""

    def handle(message: Message) -> Message:
        cfg = RoundConfig.from_record(message.content.config_records[CONFIG_RECORD])
        header, global_adapter = codec.decode(message.content)
        if message.metadata.message_type == "evaluate":
            from flwr.app import ConfigRecord, MetricRecord

            metrics = eval_metrics or {"num_examples": 4.0, "loss": 1.0, "accuracy": 0.5}
            return Message(RecordDict({"metrics": MetricRecord(dict(metrics)),
                                       "organization": ConfigRecord({"name": name or f"org-{delta}"})}),
                           reply_to=message)
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


def test_round_zero_waits_for_the_organizations_so_the_report_has_a_base_column(tmp_path: Path) -> None:
    """In a deployment the agents join after the coordinator starts: round 0 must not score nobody."""

    class JoiningGrid(ScriptedGrid):
        def __init__(self, handlers, online_after: float):  # type: ignore[no-untyped-def]
            super().__init__(handlers)
            self.started = time.monotonic()
            self.online_after = online_after

        def get_node_ids(self):  # type: ignore[no-untyped-def]
            return list(self.handlers) if time.monotonic() - self.started >= self.online_after else []

    grid = JoiningGrid({1: honest(0.1), 2: honest(0.3)}, online_after=1.0)
    final = Job(grid, config(tmp_path, node_wait_timeout=10.0)).run()
    base = final.run_state["history"][0]
    assert base["round"] == 0 and sorted(base["eval"]) == ["org-0.1", "org-0.3"]
    assert base["eval_overall"]["num_examples"] == 8.0


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


# ---- issue 11: weights capped, evaluate replies validated, names bound, text escaped ------

def test_a_huge_example_count_weighs_no_more_than_the_cap(tmp_path: Path) -> None:
    """An organization claiming 10^12 examples counts as max-weight examples: the mean is
    exactly (0.1·10 + 0.3·10 − 5·100) / 120 away from the global, and the cap and the capped
    reply are in the round history, the report and the specialist's provenance."""
    from server.app import run_job

    grid = ScriptedGrid({1: honest(0.1, 10, name="bank-a"), 2: honest(0.3, 10, name="bank-b"),
                         3: honest(-5.0, 10**12, name="mallory")})
    cfg = config(tmp_path, min_nodes=3, max_weight=100)
    start = Job(grid, cfg)._resume_or_init().adapter   # round 0 only; run_job resumes from it
    out = run_job(grid, cfg)
    final = CheckpointStore(cfg.checkpoint_dir).latest()
    assert final is not None and final.round == 1
    for name, value in final.adapter.items():
        g = start[name].astype(np.float64)
        sent = [(start[name] + np.float32(d)).astype(np.float64) for d in (0.1, 0.3, -5.0)]
        exact = ((sent[0] * 10 + sent[1] * 10 + sent[2] * 100) / 120).astype(np.float32)
        assert value.tobytes() == exact.tobytes(), name                  # FedAvg's float64 sum, capped weights
        np.testing.assert_allclose(value, g + (0.1 * 10 + 0.3 * 10 - 5.0 * 100) / 120, atol=1e-6)
    summary = final.run_state["history"][1]
    assert summary["max_weight"] == 100 and summary["capped"] == ["mallory"]
    assert sorted(summary["accepted"]) == ["bank-a", "bank-b", "mallory"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["max_weight"] == 100 and report["capped_replies"] == 1
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["max_weight"] == 100 and provenance["capped_replies"] == 1


def test_train_loss_is_weighted_by_capped_counts_and_non_finite_metrics_are_refused(tmp_path: Path) -> None:
    grid = ScriptedGrid({
        1: honest(0.1, 10, metrics={"train_loss": 1.0}),
        2: honest(0.3, 30, metrics={"train_loss": 2.0}),
        3: honest(0.2, 10**12, metrics={"train_loss": 4.0}),                  # weighs 100
        4: honest(0.4, 10, metrics={"train_loss": float("nan")}),
        5: honest(0.5, 10, metrics={"train_loss": 1.0, "train_steps": float("inf")}),
        6: honest(0.6, 10, metrics={"train_loss": -3.0}),
        7: honest(0.7, 10),                                                   # no train loss: not averaged
    })
    summary = Job(grid, config(tmp_path, min_nodes=7, min_replies=2, max_weight=100)).run().run_state["history"][1]
    assert sorted((r["org"], r["reason"]) for r in summary["rejected"]) == [
        ("org-0.4", "non_finite"), ("org-0.5", "non_finite"), ("org-0.6", "metric_value")]
    assert summary["train_loss"] == (1.0 * 10 + 2.0 * 30 + 4.0 * 100) / 140


def _evaluate_reply(records: dict[str, object]) -> Handler:
    """Trains as a broken agent does (an error), evaluates with ``records`` as its reply's content."""
    def handle(message: Message) -> Message:
        if message.metadata.message_type == "train":
            return failing(message)
        if "error" in records:
            return Message(Error(code=1, reason=str(records["error"])), reply_to=message)
        return Message(RecordDict(records), reply_to=message)  # type: ignore[arg-type]
    return handle


HONEST_EVAL = {1: ({"num_examples": 4.0, "loss": 1.0, "accuracy": 0.25}, "bank-a"),
               2: ({"num_examples": 12.0, "loss": 2.0, "accuracy": 0.75}, "bank-b")}
HONEST_OVERALL = {"num_examples": 16.0, "loss": 1.75, "accuracy": 0.625, "perplexity": math.exp(1.75)}


def _honest_evaluators() -> dict[int, Handler]:
    return {node: honest(0.1 * node, eval_metrics=metrics, name=name) for node, (metrics, name) in HONEST_EVAL.items()}


def test_bad_evaluate_replies_are_refused_by_name_and_the_overall_is_the_honest_one(tmp_path: Path) -> None:
    from flwr.app import ConfigRecord, MetricRecord

    def org(n: int) -> ConfigRecord:
        return ConfigRecord({"name": f"attacker-{n}"})

    good = {"num_examples": 4.0, "loss": 1.0, "accuracy": 1.0}
    attacks: dict[int, tuple[dict[str, object], str]] = {
        3: ({"organization": org(3)}, "malformed"),                                            # no metrics record
        4: ({"metrics": MetricRecord({**good, "accuracy": [0.9, 1.0]}), "organization": org(4)}, "metric_value"),
        5: ({"metrics": MetricRecord({**good, "loss": float("nan")}), "organization": org(5)}, "non_finite"),
        6: ({"metrics": MetricRecord({**good, "accuracy": float("inf")}), "organization": org(6)}, "non_finite"),
        7: ({"metrics": MetricRecord({**good, "loss": -1.0}), "organization": org(7)}, "metric_value"),
        8: ({"metrics": MetricRecord({**good, "num_examples": 1e12}), "organization": org(8)}, "num_examples"),
        9: ({"metrics": MetricRecord({**good, "num_examples": -5}), "organization": org(9)}, "num_examples"),
        10: ({"metrics": MetricRecord({**good, "accuracy": 40.0}), "organization": org(10)}, "metric_value"),
        11: ({"metrics": MetricRecord({"loss": 1.0, "accuracy": 1.0}), "organization": org(11)}, "num_examples"),
        12: ({"metrics": ConfigRecord({"num_examples": 4.0}), "organization": org(12)}, "malformed"),
        13: ({"metrics": MetricRecord({**good, "num_examples": 2.5}), "organization": org(13)}, "num_examples"),
        14: ({"metrics": MetricRecord({**good, "num_examples": 65.0}), "organization": org(14)}, "num_examples"),
        15: ({"error": "the evaluator crashed [/bold]"}, "client_error"),
    }
    handlers = _honest_evaluators()
    handlers.update({node: _evaluate_reply(records) for node, (records, _) in attacks.items()})
    cfg = config(tmp_path, min_nodes=len(handlers), min_replies=2, eval_max_examples=64)
    history = Job(ScriptedGrid(handlers), cfg).run().run_state["history"]
    for summary in history:                                                    # round 0 and round 1
        assert sorted(summary["eval"]) == ["bank-a", "bank-b"]
        assert summary["eval"]["bank-a"] == HONEST_EVAL[1][0] and summary["eval"]["bank-b"] == HONEST_EVAL[2][0]
        assert summary["eval_overall"] == pytest.approx(HONEST_OVERALL, rel=1e-12)
        got = {r["org"]: r["reason"] for r in summary["eval_rejected"]}
        assert got == {f"attacker-{n}" if n != 15 else "node-15": reason for n, (_, reason) in attacks.items()}
    json.dumps(history)


def test_an_organization_cannot_take_another_organizations_row(tmp_path: Path) -> None:
    """Node 3 calls itself bank-a (node 1's name): its reply counts under its own row
    (node-3); bank-a's row stays node 1's. Names are bound once: node 1 cannot be
    renamed later either, and node-N (every node's fallback) and 'overall' cannot be claimed."""
    handlers = _honest_evaluators()
    handlers[3] = honest(0.3, eval_metrics={"num_examples": 8.0, "loss": 0.5, "accuracy": 1.0}, name="bank-a")
    handlers[4] = honest(0.4, eval_metrics={"num_examples": 8.0, "loss": 0.5, "accuracy": 1.0}, name="node-2")
    handlers[5] = honest(0.5, eval_metrics={"num_examples": 8.0, "loss": 0.5, "accuracy": 1.0}, name="overall")
    cfg = config(tmp_path, min_nodes=5)
    history = Job(ScriptedGrid(handlers), cfg).run().run_state["history"]
    for summary in history:
        assert summary["eval"]["bank-a"] == HONEST_EVAL[1][0]
        assert summary["eval"]["bank-b"] == HONEST_EVAL[2][0]
        assert summary["eval"]["node-3"]["accuracy"] == 1.0
        assert sorted(summary["eval"]) == ["bank-a", "bank-b", "node-3", "node-4", "node-5"]
    refused = {(r["node"], r["claimed"]) for r in history[0]["names_refused"]}
    assert refused == {("3", "bank-a"), ("4", "node-2"), ("5", "overall")}
    assert history[1]["names_refused"] == []                                  # recorded once, not every round


def test_enrolled_names_win_over_claims(tmp_path: Path) -> None:
    """With node authentication the enrollment registry names the nodes: an unenrolled node
    that claims an enrolled name, or an enrolled one claiming another's, takes nobody's row."""
    handlers = _honest_evaluators()
    handlers[1] = honest(0.1, eval_metrics=HONEST_EVAL[1][0], name="bank-b")    # enrolled as bank-a, claims bank-b
    handlers[3] = honest(0.3, eval_metrics={"num_examples": 8.0, "loss": 0.5, "accuracy": 1.0}, name="bank-a")
    cfg = config(tmp_path, min_nodes=3)
    job = Job(ScriptedGrid(handlers), cfg, enrolled=lambda: {1: "bank-a", 2: "bank-b"})
    history = job.run().run_state["history"]
    assert history[-1]["eval"]["bank-a"] == HONEST_EVAL[1][0]
    assert history[-1]["eval"]["bank-b"] == HONEST_EVAL[2][0]
    assert sorted(history[-1]["eval"]) == ["bank-a", "bank-b", "node-3"]
    assert sorted(history[-1]["accepted"]) == ["bank-a", "bank-b", "node-3"]


def test_markup_in_names_and_details_is_printed_literally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Names such as [/bold] neither crash nor restyle the per-round table, the reply lines
    or the final table: each is rendered (the real rich objects) and appears as sent."""
    import io

    from rich.console import Console

    import simulations.console as sim_console
    from server.cli.report_table import report_table
    from server.report import build_report

    out = io.StringIO()
    monkeypatch.setattr(sim_console, "console", Console(file=out, width=300, color_system=None))
    names = {1: "[/bold]", 2: "[red]evil[/red] [link=http://x]y", 3: "[bold"}
    handlers = {node: honest(0.1 * node, name=name) for node, name in names.items()}
    handlers[4] = lambda m: (Message(Error(code=1, reason="boom [/] \x1b[31m\nforged line"), reply_to=m)
                            if m.metadata.message_type == "train" else honest(0.4, name="[/]")(m))
    cfg = config(tmp_path, min_nodes=4, min_replies=3)
    history = Job(ScriptedGrid(handlers), cfg, observer=sim_console.RichObserver()).run().run_state["history"]
    report = build_report(history, {"job_id": "markup [/job]", "strategy": "fedavg"})
    final = io.StringIO()
    Console(file=final, width=300, color_system=None).print(report_table(report))
    printed, table = out.getvalue(), final.getvalue()
    for name in [*names.values(), "[/]"]:
        assert name in printed and name in table, name
    assert "markup [/job]" in table
    assert "boom [/] \\x1b[31m\\nforged line" in printed                      # escaped, on one line
    assert "\x1b" not in printed


def test_evaluate_reply_bound_and_duplicate_replies(tmp_path: Path) -> None:
    """An evaluate reply above EVALUATE_MAX_BYTES, one from a node never asked, or a second
    one from a node are refused by name; the honest rows stay."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

    from server.validation import EVALUATE_MAX_BYTES

    def second_from_node_1(message: Message) -> Message:
        if message.metadata.message_type == "train":
            return failing(message)
        reply = honest(0.0)(message)
        reply.metadata.__dict__["_src_node_id"] = 1
        return reply

    def from_nowhere(message: Message) -> Message:
        reply = second_from_node_1(message)
        reply.metadata.__dict__["_src_node_id"] = 77
        return reply

    handlers = _honest_evaluators()
    handlers[3] = _evaluate_reply({"metrics": MetricRecord({"num_examples": 4.0}),
                                   "organization": ConfigRecord({"name": "big", "pad": b"\0" * EVALUATE_MAX_BYTES})})
    handlers[4] = _evaluate_reply({"metrics": MetricRecord({"num_examples": 4.0}),
                                   "t": ArrayRecord(array_dict={"x": Array(np.zeros(4, "<f4"))}, keep_input=True)})
    handlers[5] = second_from_node_1
    handlers[6] = from_nowhere
    history = Job(ScriptedGrid(handlers), config(tmp_path, min_nodes=6, min_replies=2)).run().run_state["history"]
    for summary in history:
        assert summary["eval"] == {"bank-a": HONEST_EVAL[1][0], "bank-b": HONEST_EVAL[2][0]}
        assert sorted(r["reason"] for r in summary["eval_rejected"]) == ["duplicate", "malformed", "malformed",
                                                                         "oversized"]
