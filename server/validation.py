"""Checks on a reply that the codec cannot make alone: who sent it, how big it
is, and whether its update was already accepted.

The codec (protos/codec.py) checks one message against what was sent: header,
names, shapes, dtypes, encodings, finite values, norm. What needs memory of
the round, or must happen before any array is decoded, lives here:

* **sender** — a reply must come from the node whose instruction it answers,
  and a node replies once per round: a second reply from a node that already
  replied this round is a DUPLICATE (whether or not the first was accepted);
* **size** — the bytes of every array and every config value of the reply are
  summed *before* anything is decoded; above ``max_update_bytes`` the reply is
  OVERSIZED. The default (``max-update-bytes = 0``) is derived from the
  expected layout: twice its fp32 size plus a fixed header slack, so fp32,
  fp16 and int8 updates all fit and a padded one does not;
* **content** — a digest of the decoded update (names and float32 values):
  one equal to an update already accepted in this round (a byte-identical
  copy sent by another node: a free rider) or in the previous round (an old
  update replayed under the current round id; replayed under its own round id
  it is a WRONG_ROUND) is a DUPLICATE.

State is per round and tiny: the node ids that replied and 32-byte digests of
the accepted updates of this round and the previous one — O(N), never an
update. A retried round (``round-retries``) starts its attempt afresh, as the
strategy does: an organization retrained from the same global may send the
very same update again, legitimately.

Under secure aggregation (server/secure_aggregation/round.py) each of the four exchanges
admits its replies with its own validator (sender, once per stage, a size the
session fixes), and a masked input's header is checked by
``check_secure_header``. Its values are masked, uniform in the ring: content
digests across rounds and value checks do not apply to them.
"""

from __future__ import annotations

import hashlib
import math
from typing import Mapping, Sequence

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID

from protos import codec
from protos.adapter import Adapter
from protos.errors import RejectReason, UpdateRejected

#: what a header, metrics and the organization record may take beyond the tensors
HEADER_SLACK_BYTES = 64 * 1024


def derived_max_update_bytes(layout: Mapping[str, Sequence[int]]) -> int:
    """The default bound: twice the fp32 size of ``layout`` plus the header slack."""
    fp32 = sum(4 * math.prod(int(d) for d in shape) for shape in layout.values())
    return 2 * fp32 + HEADER_SLACK_BYTES


def reply_bytes(content: RecordDict) -> int:
    """Bytes a reply carries: every Array's data, every config value, every metric.

    Reads lengths only; nothing is decoded or copied.
    """
    total = 0
    for record in content.array_records.values():
        for array in record.values():
            total += len(array.data) + 8 * len(array.shape) + len(array.dtype) + len(array.stype)
    for record in content.config_records.values():
        for key, value in record.items():
            total += len(key) + _value_bytes(value)
    for record in content.metric_records.values():
        for key, value in record.items():
            total += len(key) + 8 * (len(value) if isinstance(value, list) else 1)
    return total


def _value_bytes(value: object) -> int:
    if isinstance(value, (bytes, str)):
        return len(value)
    if isinstance(value, list):
        return sum(_value_bytes(item) for item in value)
    return 8


def update_digest(update: Adapter) -> bytes:
    """SHA-256 of a decoded update: tensor names, shapes and float32 values."""
    digest = hashlib.sha256()
    for name in sorted(update):
        values = np.ascontiguousarray(update[name], dtype="<f4")
        digest.update(name.encode())
        digest.update(repr(values.shape).encode())
        digest.update(values.data)   # the contiguous buffer itself: no copy of the update
    return digest.digest()


class UpdateValidator:
    """Per-round sender, size and duplicate checks for the coordinator's round loop."""

    def __init__(self, max_update_bytes: int, limit_name: str = "max-update-bytes") -> None:
        """``limit_name``: where the bound comes from, for the OVERSIZED message."""
        if max_update_bytes <= 0:
            raise ValueError(f"max_update_bytes must be > 0, got {max_update_bytes}")
        self.max_update_bytes = max_update_bytes
        self.limit_name = limit_name
        self.server_round: int | None = None
        self._replied: set[int] = set()
        self._accepted: set[bytes] = set()
        self._previous: set[bytes] = set()   # accepted in the round before

    def begin_round(self, server_round: int) -> None:
        """A new round, or a new attempt at the same round (its state starts afresh)."""
        if server_round != self.server_round:
            self._previous = self._accepted if self.server_round == server_round - 1 else set()
            self.server_round = server_round
        self._replied = set()
        self._accepted = set()

    def admit(self, node_id: int, reply: Message) -> None:
        """Before decoding: the reply answers this node's instruction, is its first
        reply this round, and is not oversized. Raises UpdateRejected."""
        sender = int(reply.metadata.src_node_id)
        if reply.has_error() and sender == SUPERLINK_NODE_ID:
            return  # Flower's own answer for that node (it stopped heartbeating, the message expired)
        if sender in self._replied:
            raise UpdateRejected(RejectReason.DUPLICATE,
                                 f"node {sender} already replied in round {self.server_round}")
        if sender != node_id:
            raise UpdateRejected(RejectReason.MALFORMED,
                                 f"a reply from node {sender} to the instruction sent to node {node_id}")
        self._replied.add(sender)
        if reply.has_error() or not reply.has_content():
            return
        size = reply_bytes(reply.content)
        if size > self.max_update_bytes:
            raise UpdateRejected(RejectReason.OVERSIZED,
                                 f"{size} bytes, at most {self.max_update_bytes} ({self.limit_name})")

    def check_fresh(self, update: Adapter) -> bytes:
        """After decoding: the update is not one already accepted. Returns its digest,
        for ``accepted`` once the strategy has taken it."""
        digest = update_digest(update)
        if digest in self._accepted:
            raise UpdateRejected(RejectReason.DUPLICATE,
                                 f"the same update was already accepted in round {self.server_round}")
        if digest in self._previous:
            raise UpdateRejected(RejectReason.DUPLICATE,
                                 "a replay of an update accepted in the previous round")
        return digest

    def accepted(self, digest: bytes) -> None:
        self._accepted.add(digest)


def check_secure_header(header: codec.UpdateHeader, expected: codec.Expectation) -> None:
    """A masked input's header (protos/secagg/wire.py, ``masked_header``) checked as a
    plain update's is: kind, job, round, base model, adapter config, tensor names,
    shapes and logical dtypes. It carries no example count, by design (it would
    describe one organization's data), so that check alone is left out."""
    names = [spec.name for spec in header.tensors]
    if len(set(names)) != len(names):
        raise UpdateRejected(RejectReason.TENSOR_NAMES, "a tensor is announced twice")
    for spec in header.tensors:
        if spec.dtype != "float32":
            raise UpdateRejected(RejectReason.TENSOR_DTYPE, f"{spec.name}: logical dtype {spec.dtype!r}")
    checked = codec.UpdateHeader()
    checked.CopyFrom(header)
    checked.num_examples = 1   # stands in for the count a masked input never states
    codec.check_header(checked, expected)
