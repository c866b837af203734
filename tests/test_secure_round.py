"""Secure aggregation in the round loop's terms: four exchanges over a Grid
(server/secure_aggregation/round.py) answered by the ClientApp's handler
(clients/secure_aggregation.py), organizations keeping their state in their own
context.state between messages. A scripted in-memory Grid; no Ray, no model.
"""

from __future__ import annotations

import itertools
import time
from typing import Callable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from clients import secure_aggregation as client_side
from protos import codec
from protos.adapter import LoraSpec
from protos.round_config import CONFIG_RECORD, RoundConfig
from protos.secagg import wire
from server.job import Job
from server.job_config import JobConfig, JobConfigError
from server.secure_aggregation import SecureRound, SecureSettings
from strategies import STRATEGIES, build_strategy
from strategies.base import AggregationError, Strategy

LORA = LoraSpec(rank=4, alpha=8.0)
SHAPES = {"m.lora_A.weight": (4, 12), "m.lora_B.weight": (12, 4), "n.lora_A.weight": (4, 6), "n.lora_B.weight": (6, 4)}


class SecureGrid(Grid):
    """Nodes run clients/secure_aggregation.handle with a scripted trainer; a node
    listed in ``silent`` for a stage never answers it (it dropped out). ``node_configs``:
    a node's Flower node config (default {}: the default policy, no node key). An
    exception at a node becomes an error reply, as Flower's ClientApp runner makes it."""

    def __init__(self, deltas: dict[int, float], weights: dict[int, int],
                 silent: dict[str, set[int]] | None = None, node_configs: dict[int, dict] | None = None) -> None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.deltas, self.weights, self.silent = deltas, weights, silent or {}
        self.node_configs = node_configs or {}
        self.stages: list[tuple[str, int]] = []   # (stage, node) of every secure-aggregation instruction handled
        self.states = {node: RecordDict() for node in deltas}
        self._pending: dict[str, Message] = {}
        self._ids = itertools.count()
        self.trained: list[int] = []

    def set_run(self, run):  # type: ignore[no-untyped-def]
        pass

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, *a, **k):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_node_ids(self):  # type: ignore[no-untyped-def]
        return list(self.deltas)

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        ids = []
        for message in messages:
            message_id = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = message_id
            self._pending[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        replies = []
        for message_id in message_ids:
            message = self._pending.get(message_id)
            if message is None:
                continue
            node = message.metadata.dst_node_id
            del self._pending[message_id]
            if message.metadata.message_type == "evaluate":
                replies.append(Message(RecordDict({"metrics": MetricRecord({"num_examples": 4.0, "loss": 1.0}),
                                                   "organization": ConfigRecord({"name": f"org-{node}"})}),
                                       reply_to=message))
                continue
            if not wire.is_secagg(message.content):   # a plain round: the trainer's reply as it is
                replies.append(Message(self._trainer(node)(message.content), reply_to=message))
                continue
            stage = message.content.config_records[wire.SECAGG_RECORD]["stage"]
            self.stages.append((stage, node))
            try:
                reply = Message(client_side.handle(message.content, self.states[node], self._trainer(node),
                                                   self.node_configs.get(node, {})), reply_to=message)
            except Exception as ex:  # what Flower's runner sends back (flwr/supernode/runtime/run_clientapp.py)
                reply = Message(Error(code=2, reason=str(type(ex)) + ":<'" + str(ex) + "'>"), reply_to=message)
            if node not in self.silent.get(stage, set()):
                replies.append(reply)  # else: done, but the reply is lost
        return replies

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def _trainer(self, node: int) -> Callable[[RecordDict], RecordDict]:
        def train(content: RecordDict) -> RecordDict:
            header, global_adapter = codec.decode(content)
            rng = np.random.default_rng(node)
            update = {k: v + np.float32(self.deltas[node]) * rng.standard_normal(v.shape).astype(np.float32)
                      for k, v in global_adapter.items()}
            self.trained.append(node)
            cfg = content.config_records.get(CONFIG_RECORD)
            job_id, lora = (cfg["job_id"], RoundConfig.from_record(cfg).lora) if cfg else ("j", LORA)
            reply = codec.encode(update, kind=codec.Kind.Value("UPDATE"), job_id=job_id, server_round=header.round,
                                 fingerprint=header.base_model_fingerprint, lora=lora,
                                 num_examples=self.weights[node])
            reply["organization"] = ConfigRecord({"name": f"org-{node}"})
            return reply
        return train

    def plain_update(self, node: int, global_adapter):  # what that organization's trainer produced
        rng = np.random.default_rng(node)
        return {k: v + np.float32(self.deltas[node]) * rng.standard_normal(v.shape).astype(np.float32)
                for k, v in global_adapter.items()}


def _global(seed: int = 0):
    rng = np.random.default_rng(seed)
    return {k: (0.05 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def _run(grid: SecureGrid, strategy_name: str = "fedavg", timeout: float = 0.3, **settings):
    global_adapter = _global()
    strategy = build_strategy(strategy_name)
    strategy.begin_round(1, global_adapter)
    train_content = codec.encode(global_adapter, kind=codec.Kind.Value("GLOBAL"), job_id="j", server_round=1,
                                 fingerprint="f", lora=LORA)
    secure = SecureRound(grid, SecureSettings(**settings), timeout=timeout, poll_interval=0.005)
    outcome = secure.run(job_id="j", server_round=1, sampled=sorted(grid.deltas), train_content=train_content,
                         reference=global_adapter, strategy=strategy, expectation=_expectation())
    return outcome, strategy, global_adapter


def _expectation(server_round: int = 1) -> codec.Expectation:
    """What the scripted organizations' update headers say (job "j", fingerprint "f")."""
    return codec.Expectation(kind=codec.Kind.Value("UPDATE"), job_id="j", server_round=server_round,
                             fingerprint="f", lora=LORA, layout=SHAPES)


def _plain(grid: SecureGrid, nodes, global_adapter, strategy_name: str = "fedavg"):
    strategy = build_strategy(strategy_name)
    strategy.begin_round(1, global_adapter)
    for node in nodes:
        strategy.accumulate(grid.plain_update(node, global_adapter), grid.weights[node])
    return strategy.finish_round()


@pytest.mark.parametrize("strategy_name,tolerance", [("fedavg", 1e-7), ("fedavgm", 1e-7), ("fedprox", 1e-7),
                                                     ("fedadam", 1e-5)])  # Adam's step ≈ η·sign(Δ): 1e-3 of it
def test_secure_round_equals_plain_round(strategy_name, tolerance):
    nodes = [11, 12, 13, 14, 15, 16]
    grid = SecureGrid({n: 0.001 * (i + 1) for i, n in enumerate(nodes)}, {n: 10 * (i + 1) for i, n in enumerate(nodes)})
    outcome, strategy, global_adapter = _run(grid, strategy_name)
    assert outcome.failure == "" and outcome.accepted == nodes and outcome.weight_sum == 210
    secure = strategy.finish_round()
    plain = _plain(grid, nodes, global_adapter, strategy_name)
    for name in SHAPES:
        np.testing.assert_allclose(secure[name], plain[name], rtol=0, atol=outcome.error_bound + tolerance)
    assert all(len(state.config_records) == 0 for state in grid.states.values())  # keys deleted after unmask


def test_secure_round_with_dropouts_after_masking_and_at_unmask():
    nodes = list(range(1, 10))                       # N = 9, t = 5
    grid = SecureGrid({n: 0.002 for n in nodes}, {n: 5 + n for n in nodes},
                      silent={wire.MASK: {2, 4, 6}, wire.UNMASK: {9}})
    outcome, strategy, global_adapter = _run(grid)
    survivors = [1, 3, 5, 7, 8, 9]                   # 9 masked in time: its input counts
    assert outcome.accepted == survivors and outcome.timed_out == [2, 4, 6, 9]
    assert sorted(grid.trained) == nodes              # 2, 4, 6 trained and masked, never arrived
    secure = strategy.finish_round()
    plain = _plain(grid, survivors, global_adapter)
    for name in SHAPES:
        np.testing.assert_allclose(secure[name], plain[name], rtol=0, atol=outcome.error_bound + 1e-7)


def test_below_threshold_the_attempt_has_no_aggregate():
    nodes = list(range(1, 8))                        # N = 7, t = 4
    grid = SecureGrid({n: 0.002 for n in nodes}, {n: 10 for n in nodes}, silent={wire.MASK: {1, 2, 3, 4}})
    outcome, strategy, _ = _run(grid)
    assert outcome.accepted == [] and "threshold is 4" in outcome.failure
    with pytest.raises(AggregationError):
        strategy.finish_round()


def test_a_tampered_reply_is_a_named_dropout():
    nodes = [1, 2, 3, 4, 5]
    grid = SecureGrid({n: 0.002 for n in nodes}, {n: 10 for n in nodes})
    real_pull = grid.pull_messages

    def pull(ids):
        replies = list(real_pull(ids))
        for reply in replies:
            record = reply.content.config_records[wire.SECAGG_RECORD]
            if reply.metadata.src_node_id == 3 and record["stage"] == wire.ADVERTISE:
                record["index"] = 1                  # claims another organization's index
        return replies

    grid.pull_messages = pull  # type: ignore[method-assign]
    outcome, strategy, _ = _run(grid)
    assert outcome.accepted == [1, 2, 4, 5]
    assert outcome.rejected == [(3, "secure_aggregation", "advertise: claims index 1, was given 3")]


# every strategy that is not linear and has no secure input of its own (dp-fedavg has: a clipped sum)
@pytest.mark.parametrize("strategy_name", [name for name, cls in STRATEGIES.items()
                                           if not cls.linear and cls.secure_input is Strategy.secure_input])
def test_strategies_that_need_each_update_refuse(strategy_name):
    strategy = build_strategy(strategy_name)
    assert not strategy.linear
    with pytest.raises(AggregationError, match="needs every individual update"):
        strategy.accumulate_secure(_global(), 10, 2)


def test_linear_strategies_declare_it():
    for name in ("fedavgm", "fedadam", "fedyogi", "fedadagrad", "ffa-lora", "fedsa-lora"):
        assert build_strategy(name).linear, name


# ---- through the Job ---------------------------------------------------------
def _job_config(tmp_path, **settings):
    base = dict(model="tiny-llama", job_id="sa", num_rounds=2, min_nodes=5, round_timeout=5.0, node_wait_timeout=2.0,
                poll_interval=0.005, run_dir=str(tmp_path), lora_r=4)
    base.update(settings)
    return JobConfig(**base)  # type: ignore[arg-type]


def test_a_secure_job_reaches_the_plain_job_s_adapter(tmp_path):
    nodes = [21, 22, 23, 24, 25]
    deltas, weights = {n: 0.001 * (i + 1) for i, n in enumerate(nodes)}, {n: 7 * (i + 1) for i, n in enumerate(nodes)}
    plain = Job(SecureGrid(deltas, weights), _job_config(tmp_path / "plain")).run()
    grid = SecureGrid(deltas, weights)
    secure = Job(grid, _job_config(tmp_path / "secure", secure_aggregation=True)).run()
    assert sorted(grid.trained) == sorted(nodes * 2)
    for name, value in plain.adapter.items():
        np.testing.assert_allclose(secure.adapter[name], value, rtol=0, atol=1e-6)
    history = secure.run_state["history"]
    assert history[-1]["accepted"] == [f"org-{n}" for n in nodes] and history[-1]["rejected"] == []


def test_secure_job_below_threshold_stops_with_the_threshold_named(tmp_path):
    grid = SecureGrid({n: 0.001 for n in range(1, 6)}, {n: 10 for n in range(1, 6)}, silent={wire.MASK: {1, 2, 3}})
    with pytest.raises(Exception, match="threshold is 3"):
        Job(grid, _job_config(tmp_path, num_rounds=1, round_timeout=0.5, secure_aggregation=True)).run()


@pytest.mark.parametrize("settings,named", [
    (dict(strategy="krum"), "needs every individual update"),
    (dict(strategy="fedavg", norm_bound=1.0), "norm-bound checks each update"),
    (dict(strategy="fedavg", min_nodes=1), "min-nodes >= 2"),
])
def test_job_config_refuses_secure_aggregation_where_it_cannot_work(tmp_path, settings, named):
    with pytest.raises(JobConfigError, match=named):
        _job_config(tmp_path, secure_aggregation=True, **settings).validate()
