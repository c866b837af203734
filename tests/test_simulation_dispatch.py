"""simulations/dispatch.py: one scan a pass hands the Simulation Engine's workers exactly
what Flower's per-node extractor would, in the same order, and marks the same delivered."""

from __future__ import annotations

import importlib
import threading
import time
from queue import Queue
from typing import Any, Iterator

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.server.superlink.fleet.vce import vce_api

from simulations import dispatch

rs = importlib.import_module("flwr.simulation.run_simulation")  # the package re-exports a function of that name

RUN_ID, TASK_ID = 7, 9


@pytest.fixture()
def link() -> Iterator[tuple[Any, Any, dict[int, int]]]:
    """An in-memory LinkState set up as run_simulation sets it up, 50 nodes registered."""
    saved = {name: getattr(rs.TaskIdentity, name) for name in ("_task_id", "_run_id", "_node_id")}
    rs.TaskIdentity.task_id, rs.TaskIdentity.run_id, rs.TaskIdentity.node_id = TASK_ID, RUN_ID, rs.SUPERLINK_NODE_ID
    factory = rs.LinkStateFactory(rs.FLWR_IN_MEMORY_DB_NAME, rs.NoOpFederationManager(), rs.ObjectStoreFactory())
    run = rs.Run.create_empty(run_id=RUN_ID)
    run.primary_task_id, run.federation_id = TASK_ID, rs.NOOP_FEDERATION_ID
    state = factory.state()
    state.run_ids[RUN_ID] = rs.RunRecord(run=run)
    state.task_store[TASK_ID] = rs.Task(task_id=TASK_ID, run_id=RUN_ID)
    nodes = vce_api._register_nodes(50, factory)
    grid = rs.InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    yield state, grid, nodes
    for name, value in saved.items():
        setattr(rs.TaskIdentity, name, value)


def push(grid: Any, node_ids: list[int], ttl: float = 600.0) -> list[str]:
    messages = [Message(content=RecordDict({"c": ConfigRecord({"i": i})}), dst_node_id=node, message_type="train",
                        ttl=ttl) for i, node in enumerate(node_ids)]
    return list(grid.push_messages(messages))


def flowers_pass(state: Any, nodes: dict[int, int]) -> list[Message]:
    """One pass of Flower's own extractor (vce_api.add_messages_to_queue's loop body)."""
    return [m for node in nodes for m in state.get_message_ins(node_id=node, limit=1)]


def test_one_scan_delivers_what_flowers_extractor_delivers_in_its_order(link: Any) -> None:
    state, grid, nodes = link
    ids = list(nodes)
    # pushed out of node order, one node twice, one instruction already expired
    push(grid, [ids[30], ids[3], ids[30], ids[12]])
    expired = push(grid, [ids[40]], ttl=0.05)
    time.sleep(0.1)
    ours = [m.metadata.message_id for m in dispatch.undelivered_per_node(state, nodes)]
    assert expired[0] not in state.message_ins_store   # deleted, as Flower's check deletes it

    # the same situation again, handed to Flower's own extractor
    for message in state.message_ins_store.values():
        message.metadata.delivered_at = ""
    theirs = [m.metadata.message_id for m in flowers_pass(state, nodes)]

    assert ours == theirs and len(ours) == 3   # ids[3], ids[12], ids[30]'s first: node order
    assert [state.message_ins_store[m].metadata.dst_node_id for m in ours] == [ids[3], ids[12], ids[30]]
    # the next pass hands node 30 its second instruction, then nothing
    second = dispatch.undelivered_per_node(state, nodes)
    assert [m.metadata.dst_node_id for m in second] == [ids[30]]
    assert dispatch.undelivered_per_node(state, nodes) == []
    assert all(m.metadata.delivered_at for m in state.message_ins_store.values())


def test_the_engine_runs_the_one_scan_extractor_inside_and_flowers_after(link: Any) -> None:
    state, grid, nodes = link
    flowers = vce_api.add_messages_to_queue
    with dispatch.delivering_in_one_scan() as active:
        assert active and vce_api.add_messages_to_queue is not flowers
        queue: Queue[Message] = Queue()
        stop = threading.Event()
        pushed = push(grid, list(nodes)[:5])
        thread = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, queue, nodes, stop))
        thread.start()
        got = [queue.get(timeout=5).metadata.message_id for _ in pushed]
        stop.set()
        thread.join(timeout=5)
        assert got == pushed and queue.empty()
    assert vce_api.add_messages_to_queue is flowers
