"""Hands pushed instructions to the Simulation Engine's workers in one scan of the store.

Flower 1.41's Simulation Engine feeds its Ray workers from a thread
(``vce_api.add_messages_to_queue``) that, every 0.1 s, asks the in-memory
LinkState for each registered node in turn whether an instruction waits for
it (``get_message_ins(node_id, limit=1)``). Each such ask walks every stored
instruction and re-checks it (expiry, federation membership), and an
instruction stays stored until the coordinator pulls its reply: a pass costs
nodes × instructions checks. With 1000 virtual organizations and 100
sampled that is ~10^5 checks of pure Python a pass, so the thread keeps most
of a core — and the GIL of the process whose other threads hand messages to
the actors and run the ServerApp — busy for the whole training phase, on
the machine the actors train on (benchmarks/fleet_dispatch.py times a pass).

``delivering_in_one_scan`` swaps in a thread that does the same in one pass
over the stored instructions: the same checks (``_check_stored_messages`` on
all of them at once), the same choice (per node, its oldest undelivered
instruction), marked delivered the same way and queued in the same node
order — so the same messages reach the same workers in the same order, at
O(nodes + instructions) a pass. Only an ``InMemoryLinkState`` (what
``run_simulation`` uses) is scanned so; any other state, or a Flower whose
engine no longer has the function, keeps Flower's own.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from queue import Queue
from typing import Any

from flwr.app import Message

log = logging.getLogger("silotune.simulate")

#: Flower's own pause between two passes (vce_api.add_messages_to_queue)
PASS_INTERVAL = 0.1


def undelivered_per_node(state: Any, nodes: Mapping[int, Any]) -> list[Message]:
    """Each node's oldest undelivered instruction, in ``nodes``' order, marked delivered:
    what one pass of Flower's ``get_message_ins(node, limit=1)`` over ``nodes`` returns."""
    from flwr.supercore.date import now

    first: dict[int, Message] = {}
    with state.lock:
        # expired ones, or ones whose nodes left the federation, are deleted here as Flower's ask does
        state._check_stored_messages(set(state.message_ins_store))
        for message in state.message_ins_store.values():   # insertion order: oldest first
            node = message.metadata.dst_node_id
            if node not in first and message.metadata.delivered_at == "":
                first[node] = message
    chosen = [first[node] for node in nodes if node in first]
    delivered_at = now().isoformat()
    for message in chosen:
        message.metadata.delivered_at = delivered_at
    return chosen


def _add_messages_to_queue(state: Any, queue: Queue[Message], nodes_mapping: Mapping[int, Any],
                           f_stop: threading.Event) -> None:
    """Flower's extractor thread, one scan a pass (same signature as vce_api's)."""
    while not f_stop.is_set():
        for message in undelivered_per_node(state, nodes_mapping):
            queue.put(message)
        f_stop.wait(PASS_INTERVAL)


def _engine() -> Any | None:
    """Flower's Simulation Engine module, if it still has the extractor this replaces."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
        from flwr.server.superlink.linkstate import InMemoryLinkState
    except ImportError:
        return None
    if not callable(getattr(vce_api, "add_messages_to_queue", None)) \
            or not callable(getattr(InMemoryLinkState, "_check_stored_messages", None)):
        return None
    return vce_api


@contextlib.contextmanager
def delivering_in_one_scan() -> Iterator[bool]:
    """While inside, the Simulation Engine started here feeds its workers in one scan a pass.
    Yields whether it does (False: this Flower's engine is not the one this was written for)."""
    vce_api = _engine()
    if vce_api is None:
        log.warning("this Flower's Simulation Engine is not the one simulations/dispatch.py was written for: "
                    "its own extractor runs (a pass costs nodes × stored instructions)")
        yield False
        return
    from flwr.server.superlink.linkstate import InMemoryLinkState

    flowers = vce_api.add_messages_to_queue

    def extractor(state: Any, queue: Queue[Message], nodes_mapping: Mapping[int, Any],
                  f_stop: threading.Event) -> None:
        if isinstance(state, InMemoryLinkState):
            _add_messages_to_queue(state, queue, nodes_mapping, f_stop)
        else:
            flowers(state, queue, nodes_mapping, f_stop)

    vce_api.add_messages_to_queue = extractor
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = flowers
