"""One pass of the Simulation Engine's extractor: Flower's per-node asks against one scan.

    python benchmarks/fleet_dispatch.py                       # 1000 nodes, 100 instructions stored
    python benchmarks/fleet_dispatch.py --nodes 200 --pending 20

Builds Flower's in-memory LinkState as ``run_simulation`` does, registers the
nodes, pushes one instruction to each of ``--pending`` of them, and times (CPU
and wall) one pass of Flower's extractor (``get_message_ins(node, limit=1)``
for every node) and one of ``simulations.dispatch.undelivered_per_node`` on the
same instructions, which must hand out the same messages. Each pass is timed
twice: the first delivers, the second finds nothing new — the state most of a
training phase is in, since an instruction stays stored until its reply is
pulled. The engine repeats a pass every 0.1 s for the whole phase.
"""

from __future__ import annotations

import argparse
import importlib
import time
from typing import Any, Callable

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.server.superlink.fleet.vce import vce_api

from simulations.dispatch import PASS_INTERVAL, undelivered_per_node

rs = importlib.import_module("flwr.simulation.run_simulation")  # the package re-exports a function of that name


def link_state(nodes: int) -> tuple[Any, Any, dict[int, int]]:
    run = rs.Run.create_empty(run_id=7)
    run.primary_task_id, run.federation_id = 9, rs.NOOP_FEDERATION_ID
    rs.TaskIdentity.task_id, rs.TaskIdentity.run_id, rs.TaskIdentity.node_id = 9, 7, rs.SUPERLINK_NODE_ID
    factory = rs.LinkStateFactory(rs.FLWR_IN_MEMORY_DB_NAME, rs.NoOpFederationManager(), rs.ObjectStoreFactory())
    state = factory.state()
    state.run_ids[7] = rs.RunRecord(run=run)
    state.task_store[9] = rs.Task(task_id=9, run_id=7)
    mapping = vce_api._register_nodes(nodes, factory)
    grid = rs.InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, mapping


def timed(one_pass: Callable[[], list[Message]]) -> tuple[float, float, list[str]]:
    cpu, wall = time.process_time(), time.perf_counter()
    handed = [m.metadata.message_id for m in one_pass()]
    return time.process_time() - cpu, time.perf_counter() - wall, handed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--pending", type=int, default=100)
    args = parser.parse_args()
    if not 0 < args.pending <= args.nodes:
        raise SystemExit(f"--pending must be in 1..--nodes ({args.nodes}), got {args.pending}")

    state, grid, mapping = link_state(args.nodes)
    grid.push_messages([Message(content=RecordDict({"c": ConfigRecord({"i": i})}), dst_node_id=node,
                                message_type="train", ttl=600) for i, node in enumerate(list(mapping)[:args.pending])])

    def flowers() -> list[Message]:
        return [m for node in mapping for m in state.get_message_ins(node_id=node, limit=1)]

    def ours() -> list[Message]:
        return undelivered_per_node(state, mapping)

    rows = []
    for name, one_pass in (("Flower's per-node asks", flowers), ("one scan (simulations/dispatch.py)", ours)):
        first = timed(one_pass)
        again = timed(one_pass)
        rows.append((name, first, again))
        for message in state.message_ins_store.values():   # undelivered again, for the next contender
            message.metadata.delivered_at = ""
    if rows[0][1][2] != rows[1][1][2]:
        raise SystemExit("the two extractors handed out different messages")

    print(f"{args.nodes} nodes, {args.pending} instructions stored; one pass, CPU s (wall s); "
          f"the engine passes every {PASS_INTERVAL} s")
    for name, (cpu1, wall1, handed), (cpu2, wall2, _) in rows:
        print(f"  {name:36s} delivering {len(handed)}: {cpu1:.4f} ({wall1:.4f})   nothing new: {cpu2:.4f} ({wall2:.4f})")
    base, new = rows[0][2][0], rows[1][2][0]
    print(f"  CPU per pass, nothing new: {base / max(new, 1e-9):.0f}x less; share of one core while a phase "
          f"waits: {base / (base + PASS_INTERVAL):.0%} -> {new / (new + PASS_INTERVAL):.1%}")


if __name__ == "__main__":
    main()
