"""Push messages and handle replies as they arrive, until a deadline.

Flower's ``Grid.send_and_receive`` returns only when every reply is in and
holds them all; this pulls whatever has arrived every ``poll_interval``
seconds, hands each reply to ``on_reply`` (which validates it, feeds the
strategy and drops it), and gives up on the rest at the deadline.

Replies are pulled PULL_BATCH message ids at a time, so the coordinator
materializes at most that many replies at once; ``on_reply`` measures each
(server/validation.py: ``reply_bytes``, before any array is decoded) and refuses
an oversized one, and its arrays are released as soon as it is handled. A reply
cannot be refused *before* it is pulled: Flower 1.41's ``Grid.pull_messages``
returns whole Messages (``HttpGrid`` pulls every object of a reply's object
tree, which lists ids but no sizes, before returning it), so what bounds a
reply's bytes on the way in is the HTTP body cap at the fleet entrance.

A reply that arrives after the deadline is never handed to ``on_reply``:
Flower keeps it on the SuperLink until its instruction's id is pulled or the
instruction's TTL runs out, so the ids given up on go to a ``LateReplies``
and later exchanges pull them, log each late reply as discarded and drop it
(see ``LateReplies``).
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from protos.codec import INLINE_KEY
from protos.records import HEADER_RECORD
from server.validation import network_text

log = logging.getLogger("silotune.server")


@dataclass
class ExchangeResult:
    replied: list[int] = field(default_factory=list)     # node ids that answered in time
    timed_out: list[int] = field(default_factory=list)   # node ids that did not


#: replies materialized at once: pull_messages returns every reply it is asked
#: for that has arrived, so asking for a few ids at a time keeps the
#: coordinator's memory at O(PULL_BATCH × P) however many arrive together.
PULL_BATCH = 4


#: how often (seconds) an exchange also pulls the replies given up on earlier
LATE_PULL_INTERVAL = 1.0

#: reply bytes handled between two full garbage collections (see ``release``)
GC_EVERY_BYTES = 64 * 2**20


class _Collector:
    """When to run the cyclic garbage collector over the coordinator's heap.

    Flower's Message objects sit in reference cycles, so a reply is freed only by
    the cyclic collector, which counts objects, not bytes: left alone, updates of
    ~P bytes pile up. ``release`` empties a handled reply's arrays and inline
    tensors at once (their bytes go by reference counting, whatever the cycle), so only the small shells
    wait for the collector — which then runs every GC_EVERY_BYTES of replies, not
    after every pull batch: a full collection walks the whole heap (torch,
    transformers, Flower, Ray: tens of ms), and in a fleet of small updates that,
    under the GIL, kept the Simulation Engine's dispatch threads and so the
    training actors waiting half the time.
    """

    def __init__(self) -> None:
        self.pending = 0

    def release(self, reply: Message) -> None:
        if reply.has_error():
            return  # an error reply carries no content
        for record in reply.content.array_records.values():
            for array in record.values():
                # Emptied rather than deleted: a RecordDict keeps its records in more than
                # one dict. A numpy view on_reply kept still holds the bytes it points at.
                self.pending += len(array.data)
                array.data = b""
        header = reply.content.config_records.get(HEADER_RECORD)
        inline = header.get(INLINE_KEY) if header is not None else None
        if isinstance(inline, bytes):  # a small update's tensors, inline in its header record (protos/codec.py)
            self.pending += len(inline)
            header[INLINE_KEY] = b""
        if self.pending >= GC_EVERY_BYTES:
            self.pending = 0
            gc.collect()


_COLLECTOR = _Collector()

# Flower's own "there is no reply and there will be none" answers to a pull
_NO_REPLY_CODES = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE)


class LateReplies:
    """Instructions whose deadline passed, and what became of their replies.

    A SuperNode still busy with an instruction when the deadline passes (a
    straggler) pushes its reply whenever it is done, and the SuperLink keeps
    that reply until someone pulls the instruction's id or the instruction's
    TTL runs out. ``exchange`` hands the ids it gives up on to ``abandon``;
    every later exchange calls ``collect``, which pulls them, logs each reply
    that turned up ("discarded") and drops it. A late reply never reaches an
    ``on_reply``, so it is never counted in the round it belonged to nor in a
    later one (whose header round id would reject it anyway). Flower's own
    "no reply" answers (node unavailable, message expired) are dropped quietly.
    """

    def __init__(self) -> None:
        self._ids: dict[str, tuple[str, str, float]] = {}   # message id -> (node, what, expiry)
        self.discarded: list[dict[str, Any]] = []           # {"node", "instruction", "error"}, oldest first

    def __len__(self) -> int:
        return len(self._ids)

    def abandon(self, pending: dict[str, str], what: str, ttl: float) -> None:
        """``pending``: message id -> the node's name (organization or node id)."""
        expires = time.monotonic() + ttl
        for message_id, node in pending.items():
            self._ids[message_id] = (node, what, expires)

    def collect(self, grid: Grid, pull_batch: int = PULL_BATCH) -> None:
        now = time.monotonic()
        for message_id in [m for m, (_, _, expires) in self._ids.items() if expires < now]:
            del self._ids[message_id]  # expired on the SuperLink too: no reply can come any more
        asked = list(self._ids)
        for start in range(0, len(asked), pull_batch):
            replies = grid.pull_messages(asked[start : start + pull_batch])
            for reply in replies:
                _COLLECTOR.release(reply)  # nothing here reads its arrays
                entry = self._ids.pop(reply.metadata.reply_to_message_id, None)
                if entry is None:
                    continue
                node, what, _ = entry
                if reply.has_error() and reply.error.code in _NO_REPLY_CODES:
                    log.debug("no late reply from %s to %s: %s", node, what, network_text(reply.error.reason))
                    continue
                kind = f"error reply ({network_text(reply.error.reason)})" if reply.has_error() else "reply"
                log.warning("late %s from %s to %s arrived after its deadline: discarded", kind, node, what)
                self.discarded.append({"node": node, "instruction": what, "error": reply.has_error()})

    def take_discarded(self) -> list[dict[str, Any]]:
        """The discarded replies logged since the last call."""
        taken, self.discarded = self.discarded, []
        return taken


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    on_reply: Callable[[int, Message], None],
    *,
    timeout: float,
    poll_interval: float,
    pull_batch: int = PULL_BATCH,
    late: LateReplies | None = None,
    what: str = "instruction",
    on_pushed: Callable[[], None] | None = None,
    node_name: Callable[[int], str] = lambda node_id: f"node {node_id}",
    resend: Callable[[int, Message], Message | None] | None = None,
) -> ExchangeResult:
    """Push ``messages``, feed replies to ``on_reply`` until all are in or ``timeout`` passes.

    ``resend(node_id, reply)`` sees each reply first: a message it returns goes to that
    node in place of handling the reply, and the node's answer to it is awaited under the
    same deadline (the whole global to an organization that no longer holds the base of a
    delta). The caller bounds how often it does so per node.

    With ``late``: replies given up on earlier are pulled and discarded along
    the way, and this exchange's own given-up ids are added to it
    (``what`` names them in the log, e.g. "the round 3 train instruction";
    ``node_name`` names a node id there). ``on_pushed`` runs once the messages
    are pushed, before any pull. Each handled reply's arrays are released as
    soon as ``on_reply`` returns (``_Collector``), so ``on_reply`` must copy
    what it keeps beyond the call — numpy views keep their buffer alive.
    """
    messages = list(messages)
    ids = list(grid.push_messages(messages))
    pending = {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages) if mid}
    if on_pushed is not None:
        on_pushed()
    result = ExchangeResult()
    deadline = time.monotonic() + timeout
    next_late = time.monotonic()
    while pending and time.monotonic() < deadline:
        if late and time.monotonic() >= next_late:
            late.collect(grid, pull_batch)
            next_late = time.monotonic() + LATE_PULL_INTERVAL
        asked = list(pending)
        for start in range(0, len(asked), pull_batch):
            replies = grid.pull_messages(asked[start : start + pull_batch])
            for reply in replies:
                node_id = pending.pop(reply.metadata.reply_to_message_id, None)
                again = resend(node_id, reply) if resend is not None and node_id is not None else None
                if again is not None:
                    messages.append(again)   # its ttl counts if it is given up on
                    pending.update({mid: node_id for mid in grid.push_messages([again]) if mid})
                elif node_id is not None:  # else a duplicate delivery of a reply already handled
                    result.replied.append(node_id)
                    on_reply(node_id, reply)
                _COLLECTOR.release(reply)  # handled or a duplicate: its arrays go now
        if pending:
            time.sleep(poll_interval)
    result.timed_out = sorted(pending.values())
    if result.timed_out:
        log.warning("deadline of %gs passed: no reply from %s to %s", timeout,
                    ", ".join(node_name(n) for n in result.timed_out), what)
        if late is not None:
            late.abandon({mid: node_name(n) for mid, n in pending.items()}, what,
                         max((m.metadata.ttl for m in messages), default=timeout))
    return result


#: how often a job waiting for organizations asks the SuperLink who is online: each ask costs
#: the SuperLink a request, and a coordinator may wait for hours (benchmarks/idle_coordinator.py)
NODE_POLL_SECONDS = 2.0


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, poll_interval: float) -> list[int]:
    """Online node ids once at least ``minimum`` are connected; never waits forever."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        left = deadline - time.monotonic()
        if left <= 0:
            raise too_few_nodes(len(nodes), minimum, timeout)
        time.sleep(min(max(poll_interval, NODE_POLL_SECONDS), left))


def too_few_nodes(online: int, minimum: int, timeout: float) -> QuorumError:
    """The error of a job whose organizations did not come in time; the coordinator, which waits
    for them before it submits a job's run, ends with the same words."""
    return QuorumError(f"only {online} organization(s) online after {timeout:.0f}s; "
                       f"min-nodes={minimum}. Start more agents or lower min-nodes.")


class QuorumError(RuntimeError):
    """Not enough organizations online or not enough valid replies in time."""
