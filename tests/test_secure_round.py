"""Secure aggregation in the round loop's terms: four exchanges over a Grid
(server/secure_round.py) answered by the ClientApp's handler
(clients/secure_round.py), organizations keeping their state in their own
context.state between messages. A scripted in-memory Grid; no Ray, no model.
"""

from __future__ import annotations

import itertools
import time
from typing import Callable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from clients import secure_round as client_side
from protos import codec
from protos.adapter import LoraSpec
from protos.secagg import wire
from server.secure_round import SecureRound, SecureSettings
from strategies import build_strategy
from strategies.base import AggregationError

LORA = LoraSpec(rank=4, alpha=8.0)
SHAPES = {"m.lora_A.weight": (4, 12), "m.lora_B.weight": (12, 4), "n.lora_A.weight": (4, 6), "n.lora_B.weight": (6, 4)}


class SecureGrid(Grid):
    """Nodes run clients/secure_round.handle with a scripted trainer; a node
    listed in ``silent`` for a stage never answers it (it dropped out)."""

    def __init__(self, deltas: dict[int, float], weights: dict[int, int],
                 silent: dict[str, set[int]] | None = None) -> None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.deltas, self.weights, self.silent = deltas, weights, silent or {}
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
            content = client_side.handle(message.content, self.states[node], self._trainer(node))
            if node not in self.silent.get(wire.stage_of(message.content)[0], set()):
                replies.append(Message(content, reply_to=message))  # else: done, but the reply is lost
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
            reply = codec.encode(update, kind=codec.Kind.Value("UPDATE"), job_id="j", server_round=header.round,
                                 fingerprint="f", lora=LORA, num_examples=self.weights[node])
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
                         reference=global_adapter, strategy=strategy)
    return outcome, strategy, global_adapter


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


@pytest.mark.parametrize("strategy_name", ["median", "krum", "norm-bounded", "exact-lora", "flexlora", "hetlora"])
def test_strategies_that_need_each_update_refuse(strategy_name):
    strategy = build_strategy(strategy_name)
    assert not strategy.linear
    with pytest.raises(AggregationError, match="needs every individual update"):
        strategy.accumulate_secure(_global(), 10, 2)


def test_linear_strategies_declare_it():
    for name in ("fedavgm", "fedadam", "fedyogi", "fedadagrad", "ffa-lora", "fedsa-lora"):
        assert build_strategy(name).linear, name
