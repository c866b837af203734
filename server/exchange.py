"""Push messages and handle replies as they arrive, until a deadline.

Flower's ``Grid.send_and_receive`` returns only when every reply is in and
holds them all; this pulls whatever has arrived every ``poll_interval``
seconds, hands each reply to ``on_reply`` (which validates it, feeds the
strategy and drops it), and gives up on the rest at the deadline. A reply
that arrives after the deadline belongs to message ids nobody pulls again,
so it can never leak into the next round.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

log = logging.getLogger("silotune.server")


@dataclass
class ExchangeResult:
    replied: list[int] = field(default_factory=list)     # node ids that answered in time
    timed_out: list[int] = field(default_factory=list)   # node ids that did not


#: replies materialized at once: pull_messages returns every reply it is asked
#: for that has arrived, so asking for a few ids at a time keeps the
#: coordinator's memory at O(PULL_BATCH × P) however many arrive together.
PULL_BATCH = 4


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    on_reply: Callable[[int, Message], None],
    *,
    timeout: float,
    poll_interval: float,
    pull_batch: int = PULL_BATCH,
) -> ExchangeResult:
    messages = list(messages)
    ids = list(grid.push_messages(messages))
    pending = {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages) if mid}
    result = ExchangeResult()
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        asked = list(pending)
        for start in range(0, len(asked), pull_batch):
            replies = grid.pull_messages(asked[start : start + pull_batch])
            for reply in replies:
                node_id = pending.pop(reply.metadata.reply_to_message_id, None)
                if node_id is None:
                    continue  # a duplicate delivery of a reply already handled
                result.replied.append(node_id)
                on_reply(node_id, reply)
            if replies:
                # Flower's Message objects sit in reference cycles, so their
                # arrays wait for the cyclic collector, which counts objects,
                # not bytes: without this, updates of ~P bytes pile up.
                del replies, reply
                gc.collect()
        if pending:
            time.sleep(poll_interval)
    result.timed_out = sorted(pending.values())
    if result.timed_out:
        log.warning("deadline of %.0fs passed: no reply from nodes %s", timeout, result.timed_out)
    return result


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, poll_interval: float) -> list[int]:
    """Online node ids once at least ``minimum`` are connected; never waits forever."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() >= deadline:
            raise QuorumError(
                f"only {len(nodes)} organization(s) online after {timeout:.0f}s; "
                f"min-nodes={minimum}. Start more agents or lower min-nodes."
            )
        time.sleep(max(poll_interval, 0.5))


class QuorumError(RuntimeError):
    """Not enough organizations online or not enough valid replies in time."""
