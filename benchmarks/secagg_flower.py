"""Flower 1.41's SecAgg+ (its legacy workflow), run in one process for timing.

``SecAggPlusWorkflow`` runs unchanged against a ``LoopbackGrid``: a Grid whose
``send_and_receive`` hands each message to Flower's own ``secaggplus_mod`` for
the destination node (each node keeps its own Context state across stages,
as a SuperNode would) and returns the replies. The mod's ``call_next`` is the
"training": it returns the node's update as a FitRes. Every call into the mod
is timed and attributed to its stage, so

* client time per stage = time inside ``secaggplus_mod`` (the "masking" stage
  decrypts shares, quantizes, adds the masks: what our ``MaskingClient.mask`` does);
* coordinator time per stage = the stage's wall time minus the time its
  clients took (the grid itself only passes references).

Bytes per client: every bytes value and Array a node's replies carry.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod.secure_aggregation.secaggplus_mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class _Proxy(ClientProxy):
    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, *a):  # pragma: no cover - the workflow never calls these
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


def _stage_of(msg: Message) -> str:
    return str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])


def _reply_bytes(content: RecordDict) -> int:
    total = 0
    for record in content.config_records.values():
        for value in record.values():
            values = value if isinstance(value, list) else [value]
            total += sum(len(v) for v in values if isinstance(v, bytes))
    for record in content.array_records.values():
        total += sum(len(array.data) for array in record.values())
    return total


def _delivered_copy(msg: Message) -> Message:
    """The message with its own ConfigRecords (arrays are shared: nothing writes them)."""
    content = RecordDict()
    for key, record in msg.content.items():
        content[key] = ConfigRecord(dict(record)) if isinstance(record, ConfigRecord) else record
    copy = Message(content, dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type,
                   group_id=msg.metadata.group_id)
    return copy


class LoopbackGrid(Grid):
    """Delivers each message to ``secaggplus_mod`` of its node, in process."""

    def __init__(self, updates: dict[int, list[np.ndarray]], weights: dict[int, int],
                 dropped_before_masked: Iterable[int] = ()) -> None:
        self.updates, self.weights = updates, weights
        self.dropped = set(dropped_before_masked)
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={})
                         for nid in updates}
        self.client_seconds: dict[str, float] = defaultdict(float)     # stage -> Σ over nodes
        self.client_calls: dict[str, list[float]] = defaultdict(list)  # stage -> per node
        self.bytes_up: dict[int, int] = defaultdict(int)
        self.masked_bytes: dict[int, int] = {}   # the masked-vector stage's reply alone

    # the workflow only uses send_and_receive
    def set_run(self, run):  # pragma: no cover
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *a, **k):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.updates)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def _train(self, nid: int):
        def call_next(msg: Message, ctx: Context) -> Message:
            fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(self.updates[nid]), self.weights[nid], {})
            return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
        return call_next

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg = _delivered_copy(msg)  # a SuperNode gets its own copy; the mod pops keys from it
            nid = msg.metadata.dst_node_id
            stage = _stage_of(msg)
            msg.metadata.__dict__["_message_id"] = f"{nid}-{stage}"  # replies point at it
            started = time.perf_counter()
            reply = secaggplus_mod(msg, self.contexts[nid], self._train(nid))
            elapsed = time.perf_counter() - started
            self.client_seconds[stage] += elapsed
            self.client_calls[stage].append(elapsed)
            if stage == "collect_masked_vectors" and nid in self.dropped:
                continue  # masked, but the reply never arrives
            self.bytes_up[nid] += _reply_bytes(reply.content)
            if stage == "collect_masked_vectors":
                self.masked_bytes[nid] = _reply_bytes(reply.content)
            replies.append(reply)
        return replies


class TimedWorkflow(SecAggPlusWorkflow):
    """The workflow with each stage's wall time recorded."""

    stage_seconds: dict[str, float]

    def _timed(self, name, step, grid, context, state):
        started = time.perf_counter()
        ok = step(grid, context, state)
        self.stage_seconds[name] = time.perf_counter() - started
        return ok

    def setup_stage(self, grid, context, state):
        return self._timed("setup", super().setup_stage, grid, context, state)

    def share_keys_stage(self, grid, context, state):
        return self._timed("share_keys", super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(self, grid, context, state):
        return self._timed("collect_masked_vectors", super().collect_masked_vectors_stage, grid, context, state)

    def unmask_stage(self, grid, context, state):
        return self._timed("unmask", super().unmask_stage, grid, context, state)


def run_flower_secaggplus(updates: dict[int, list[np.ndarray]], weights: dict[int, int], threshold: int,
                          clip: float, dropped: Iterable[int] = ()) -> dict:
    """One SecAgg+ round over ``updates`` (node id → arrays), full graph (num_shares = N).

    Returns timings, bytes per client and the aggregate Flower's FedAvg produced.
    """
    n = len(updates)
    # what a ServerApp process has set when it builds messages
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    grid = LoopbackGrid(updates, weights, dropped)
    manager = SimpleClientManager()
    for nid in updates:
        manager.register(_Proxy(nid))
    strategy = LegacyFedAvg(fraction_fit=1.0, min_fit_clients=n, min_available_clients=n)
    context = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=manager)
    first = next(iter(updates.values()))
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.zeros_like(a) for a in first]), keep_input=True)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    workflow = TimedWorkflow(num_shares=n, reconstruction_threshold=threshold, clipping_range=clip,
                             max_weight=float(max(weights.values())))
    workflow.stage_seconds = {}
    started = time.perf_counter()
    workflow(grid, context)
    total = time.perf_counter() - started
    if "unmask" not in workflow.stage_seconds:
        raise RuntimeError("Flower's SecAgg+ halted before unmasking")
    record: ArrayRecord = context.state.array_records[MAIN_PARAMS_RECORD]
    result = [a.numpy() for a in record.values()]
    coordinator = {stage: workflow.stage_seconds[stage] - grid.client_seconds.get(stage, 0.0)
                   for stage in workflow.stage_seconds}
    masking = grid.client_calls["collect_masked_vectors"]
    return {
        "total_s": total,
        "coordinator_s": coordinator,
        "client_mask_s": float(np.median(masking)),
        "client_unmask_s": float(np.median(grid.client_calls["unmask"])),
        "client_keys_s": float(np.median([a + b for a, b in zip(grid.client_calls["setup"],
                                                                 grid.client_calls["share_keys"])])),
        "bytes_up": int(np.median([grid.bytes_up[nid] for nid in updates if nid not in set(dropped)])),
        "masked_bytes": int(np.median(list(grid.masked_bytes.values()))),
        "result": result,
    }
