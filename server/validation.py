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

Metrics (``check_metrics``): a train reply's header metrics and an evaluate
reply's metrics record are each a few finite scalars (at most ``MAX_METRICS``,
printable keys of at most ``MAX_METRIC_KEY`` characters); the metrics the
coordinator reads have bounds (``METRIC_BOUNDS``: losses >= 0, accuracy, macro-F1 and
exact match in [0, 1], perplexity >= 1; the same for the local-only ``local_`` ones). A NaN or Inf is NON_FINITE, a list or an
out-of-bounds value METRIC_VALUE. A train reply with a bad metric is refused
whole, not stripped of the metric: an agent that sends a NaN loss is broken or
lying, and its update is no more trustworthy than its loss.

Evaluate replies (``check_evaluate_reply``) go through an ``UpdateValidator``
of their own (sender, one reply per node, at most ``EVALUATE_MAX_BYTES``),
then: no arrays, exactly one MetricRecord (``protos.records.METRICS_RECORD``)
and at most the organization's ConfigRecord (``ORG_RECORD``) — anything else is
MALFORMED; the metrics as above; ``num_examples`` an integer in [1,
eval-max-examples] (each organization is told to score at most that many; more
is a lie, fewer than one says nothing) — else NUM_EXAMPLES.

Organization names (``OrganizationNames``): a node's name is bound once, for
the whole job, and a reply's claim never rebinds it. With node authentication
(``silotune coordinator`` without ``--insecure``) the SuperLink starts the
ServerApp with ``SILOTUNE_ENROLLMENT_STATE_DIR``; the names then come from the
coordinator's enrollment registry (node id, bound by the SuperLink to the
enrolled public key, → enrolled name) and a claim is ignored. Without it
(simulation, ``--insecure``: node ids are not authenticated) a node's first
valid claim binds, unless another node holds that name; a refused claim leaves
the node as ``node-<id>`` (a form no claim may take) and is recorded, the
reply itself is still judged on its content.

Size before holding (what Flower 1.41 allows): ``Grid.pull_messages`` returns
whole, inflated Messages — the SuperLink's object tree of a reply lists object
ids but no sizes, and ``HttpGrid`` pulls every object of a reply before it
returns it; the Simulation Engine's ``InMemoryGrid`` hands over the ClientApp's
own objects. So a reply is first *measured* here, right after it is pulled
and before any array is decoded or copied, and an oversized one is refused
then; the coordinator never holds more than ``server.exchange.PULL_BATCH``
replies at once, and their arrays are released as soon as each is handled.
What bounds a reply's bytes before the coordinator receives it is the HTTP
body cap at the fleet entrance (each object pushed is one request).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID

from protos import codec
from protos.adapter import Adapter
from protos.errors import RejectReason, UpdateRejected
from protos.records import LOCAL_METRIC_PREFIX, METRICS_RECORD, ORG_RECORD
from server.superlink import ENROLLMENT_STATE_ENV   # set by a SuperLink with node authentication

log = logging.getLogger("silotune.server")

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


# ---- metrics -------------------------------------------------------------------------

#: an evaluate reply holds a few scalars and a name: it is refused above this many bytes
EVALUATE_MAX_BYTES = HEADER_SLACK_BYTES
#: metrics a reply may carry, and the length of a metric's name
MAX_METRICS = 64
MAX_METRIC_KEY = 64
#: the metrics the coordinator reads, and the closed range each must lie in
_EVAL_BOUNDS: dict[str, tuple[float, float]] = {
    "loss": (0.0, math.inf),
    "accuracy": (0.0, 1.0),
    "macro_f1": (0.0, 1.0),
    "exact_match": (0.0, 1.0),
    "perplexity": (1.0, math.inf),
}
#: the local-only adapter's metrics (run-config local-baseline) have the same bounds
METRIC_BOUNDS: dict[str, tuple[float, float]] = {
    "train_loss": (0.0, math.inf),
    **_EVAL_BOUNDS,
    **{LOCAL_METRIC_PREFIX + name: bounds for name, bounds in _EVAL_BOUNDS.items()},
}


def check_metrics(metrics: Mapping[Any, Any]) -> dict[str, float]:
    """Every metric a finite scalar, within its bounds where it has some; the
    metrics as floats. Raises UpdateRejected (MALFORMED, NON_FINITE, METRIC_VALUE)."""
    if len(metrics) > MAX_METRICS:
        raise UpdateRejected(RejectReason.MALFORMED, f"{len(metrics)} metrics, at most {MAX_METRICS}")
    checked: dict[str, float] = {}
    for key, value in metrics.items():
        if not (isinstance(key, str) and 0 < len(key) <= MAX_METRIC_KEY and key.isprintable()):
            raise UpdateRejected(RejectReason.MALFORMED, f"metric name {network_text(key, 80)}")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise UpdateRejected(RejectReason.METRIC_VALUE,
                                 f"{key}: a {type(value).__name__}, not a scalar number")
        try:
            number = float(value)
        except OverflowError:   # an integer beyond float range
            number = math.inf
        if not math.isfinite(number):
            raise UpdateRejected(RejectReason.NON_FINITE, f"metric {key} is {number}")
        low, high = METRIC_BOUNDS.get(key, (-math.inf, math.inf))
        if not low <= number <= high:
            raise UpdateRejected(RejectReason.METRIC_VALUE, f"{key}={number:.6g} outside [{low:g}, {high:g}]")
        checked[key] = number
    return checked


def check_evaluate_reply(content: RecordDict, max_examples: int) -> dict[str, float]:
    """An evaluate reply's records and metrics (module docstring); its metrics, checked.

    ``max_examples``: the most examples an organization was told to score
    (eval-max-examples)."""
    if content.array_records:
        raise UpdateRejected(RejectReason.MALFORMED, "an evaluate reply carries no arrays")
    if METRICS_RECORD not in content.metric_records:
        raise UpdateRejected(RejectReason.MALFORMED, f"no MetricRecord {METRICS_RECORD!r}")
    extra = sorted(set(content.metric_records) - {METRICS_RECORD}) + sorted(set(content.config_records) - {ORG_RECORD})
    if extra:
        raise UpdateRejected(RejectReason.MALFORMED, f"unexpected record(s) {network_text(extra[:3], 120)}")
    metrics = check_metrics(content.metric_records[METRICS_RECORD])
    count = metrics.get("num_examples")
    if count is None:
        raise UpdateRejected(RejectReason.NUM_EXAMPLES, "no num_examples")
    if not (count.is_integer() and 1 <= count <= max_examples):
        raise UpdateRejected(RejectReason.NUM_EXAMPLES,
                             f"num_examples={count:.6g}, expected an integer in [1, {max_examples}] (eval-max-examples)")
    return metrics


# ---- text from the network -----------------------------------------------------------

def network_text(value: object, limit: int = 200) -> str:
    """Text that came from the network, safe for a log line or a JSON report: non-printable
    characters escaped (no forged log line, no terminal escape), at most ``limit`` characters.
    Rich markup is escaped where it is printed (simulations/console.py, server/cli/report_table.py)."""
    text = value if isinstance(value, str) else repr(value)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---- organization names --------------------------------------------------------------

MAX_ORG_NAME = 128
#: names no organization may claim: the fallback of every node, and rows of the tables
_RESERVED = re.compile(r"node-[0-9]+|overall|\(all\)")
#: how often (seconds) the enrollment registry is read again for a node it did not name
ENROLLED_RELOAD_INTERVAL = 2.0


def fallback_name(node_id: int | str) -> str:
    """The name of a node that has none bound: unique, and no claim may take it."""
    return f"node-{node_id}"


def _claimed(reply: Message | None) -> object:
    """The name a reply claims, as sent (any type), or None when it claims none."""
    if reply is None or reply.has_error() or not reply.has_content():
        return None
    record = reply.content.config_records.get(ORG_RECORD)
    if record is None:
        return None
    return record.get("name", "")


class OrganizationNames:
    """node id → organization name, bound once per job (module docstring).

    ``bound``: the job's table (``JobState.org_names``, node id as a string →
    name, saved in every checkpoint), updated in place. ``enrolled``: with node
    authentication, a function giving the enrollment registry's node id → name;
    those names are then the only ones used.
    """

    def __init__(self, bound: dict[str, str], enrolled: Callable[[], Mapping[int, str]] | None = None,
                 online: Callable[[], Iterable[int]] | None = None) -> None:
        self.bound = bound
        self.enrolled = enrolled
        # without enrollment an organization that restarts comes back as a new node: its name may
        # move to the new node once the node holding it is no longer online (asked only then)
        self.online = online
        self._owner = {name: node for node, name in bound.items()}
        self._registry: Mapping[int, str] = {}
        self._loaded_at = -math.inf
        self._refused_claims: set[tuple[str, str]] = set()   # (node, claim) already recorded
        self.refused: list[dict[str, str]] = []              # since the last take_refused()

    def name(self, node_id: int) -> str:
        key = str(node_id)
        if key not in self.bound and self.enrolled is not None:
            self._bind_enrolled(node_id)
        return self.bound.get(key, fallback_name(node_id))

    def claim(self, node_id: int, reply: Message | None) -> str:
        """The node's name, after considering the name its reply claims."""
        current = self.name(node_id)
        claimed = _claimed(reply)
        if claimed is None or claimed == current:
            return current
        key = str(node_id)
        if key in self.bound:
            why = f"node {node_id} is {current!r} for this job"
        elif self.enrolled is not None:
            why = "not enrolled: with node authentication names come from enrollment only"
        else:
            why = self._refusal(node_id, claimed)
            if why is None:
                previous = self._owner.get(claimed)  # type: ignore[arg-type]
                if previous is not None and previous != key:
                    del self.bound[previous]  # an offline node's name moves to its successor
                self.bound[key] = claimed  # type: ignore[assignment]  # _refusal checked it is a str
                self._owner[claimed] = key  # type: ignore[index]
                return claimed  # type: ignore[return-value]
        self._refuse(node_id, claimed, why)
        return current

    def _refusal(self, node_id: int, claimed: object) -> str | None:
        if not isinstance(claimed, str):
            return f"not a name but {type(claimed).__name__}"
        if not (0 < len(claimed) <= MAX_ORG_NAME and claimed.isprintable() and claimed.strip() == claimed):
            return f"not a name: 1 to {MAX_ORG_NAME} printable characters, no surrounding space"
        if _RESERVED.fullmatch(claimed):
            return "a reserved name"
        owner = self._owner.get(claimed)
        if owner is not None and owner != str(node_id):
            if self.online is None or int(owner) in set(self.online()):
                return f"taken by node {owner}"
        return None

    def _refuse(self, node_id: int, claimed: object, why: str) -> None:
        text = network_text(claimed, MAX_ORG_NAME + 8)
        if (str(node_id), text) in self._refused_claims:
            return  # recorded once per job, not at every reply
        self._refused_claims.add((str(node_id), text))
        log.warning("node %s claims the name %s: refused (%s)", node_id, text, why)
        self.refused.append({"node": str(node_id), "claimed": text, "why": why})

    def _bind_enrolled(self, node_id: int) -> None:
        assert self.enrolled is not None
        if node_id not in self._registry and time.monotonic() - self._loaded_at >= ENROLLED_RELOAD_INTERVAL:
            self._registry = dict(self.enrolled())   # `silotune pki enroll` may have added it since
            self._loaded_at = time.monotonic()
        name = self._registry.get(node_id)
        if name is not None:
            self.bound[str(node_id)] = name
            self._owner.setdefault(name, str(node_id))

    def take_refused(self) -> list[dict[str, str]]:
        """The claims refused since the last call, for the round history."""
        taken, self.refused = self.refused, []
        return taken


def enrolled_names_from_env(environ: Mapping[str, str] | None = None) -> Callable[[], dict[int, str]] | None:
    """The enrollment registry's node id → name, when this ServerApp runs under a SuperLink
    with node authentication; None otherwise (names are then bound at first claim)."""
    import os

    state_dir = (os.environ if environ is None else environ).get(ENROLLMENT_STATE_ENV)
    if not state_dir:
        return None

    def load() -> dict[int, str]:
        from server.enrollment import EnrollmentError, enrollments

        try:   # revoked entries too: their node ids keep their names in this job's history
            return {row.node_id: row.name for row in enrollments(state_dir, include_revoked=True)}
        except EnrollmentError as err:
            log.error("enrollment registry unreadable, organizations are named by node id: %s", err)
            return {}
    return load
