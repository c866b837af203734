"""One round attempt under secure aggregation: four Flower exchanges instead
of one, five when the organizations sign their keys (the stages: this
package's docstring), then the strategy.

``SecureRound.run`` reads as the protocol does: advertise → share keys →
mask → (consistency) → unmask → finish. Each stage is one ``_exchange`` of TRAIN messages
whose replies go to a stage's reply handler (``_keys_reply``,
``_shares_reply``, ``_masked_reply``, ``_consistency_reply``, ``_unmask_reply``), which parses them and
hands them to the ``SecAggCoordinator`` (coordinator.py); the stage then
closes the coordinator's stage, which names who goes on to the next one.
What the stages share lives in one ``_Attempt``.

The coordinator then holds the example-weighted mean delta and the total
weight, never one organization's update, and hands global + mean delta to
the strategy (``Strategy.accumulate_secure``; linear strategies only). For
DP-FedAvg (``Strategy.secure_input`` is uniform, with an L2 clip C) every
organization masks its delta clipped to C with weight 1, the ring holds ±C
per coordinate, and the strategy gets the unweighted sum of the clipped deltas
(``accumulate_secure_sum``), to which it adds the noise once.

Every stage uses ``exchange`` (deadline, late replies, pull batches); an
organization that misses a stage, or sends something that does not verify, is
a dropout from that stage on, with a named reason. Fewer than t organizations
at any stage: the attempt has no accepted update (the job retries or stops
with its quorum error, whose log names the threshold).

What is checked, with the plain round's reasons (protos/errors.py): every
reply at every stage comes from the node it was sent to, once per stage, and
is no larger than that stage can be (``max_reply_bytes``; fixed by the
session), before anything is parsed (``UpdateValidator.admit``); a masked
input's header names this job, round, base model, adapter config and the
expected tensors (``check_secure_header``), its vector has the ring's dtype
and P + 1 values, and it is not a copy of another organization's masked input
this session. The masked values themselves are uniform ring elements: there
is no finiteness or norm to check, and the organizations' own clipping is what
bounds them (the unmasked sum is checked against what honest inputs can make).
A signed advertisement must verify under the node key it names, one key per
index; a consistency signature under the signer's; an unmask share must be the
one its dealer committed to dealing that organization — else the reply is
refused with reason ``secure_aggregation`` and a detail that names who and what,
and the stage goes on without it. A replay from another round or attempt fails its header or its
session id (both sides bind every message to the session).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from protos import codec
from protos.adapter import Adapter
from protos.errors import RejectReason, UpdateRejected
from protos.secagg import PublicKeys, RingSpec, SecAggError, Session, wire
from protos.secagg.layout import Layout, layout_of, unflatten
from protos.secagg.prg import DEFAULT_PRG
from server.exchange import LateReplies, exchange
from server.secure_aggregation.coordinator import SecAggCoordinator, SecAggResult
from server.validation import HEADER_SLACK_BYTES, UpdateValidator, check_secure_header
from strategies import AggregationError, Strategy
from strategies.base import SecureInput

log = logging.getLogger("silotune.server")

#: replies pulled at once in the key, share and unmask exchanges (a few KiB each)
SMALL_PULL_BATCH = 64
#: what a share-keys or unmask reply carries per other organization, with room to
#: spare: an index, a sealed pair of shares (160 bytes) and the commitments to both
#: (64 bytes), or one share (66 bytes)
PEER_BYTES = 384

#: ``on_reply(node, reply, accepted, detail)``
ReplyObserver = Callable[[int, Message | None, bool, str], None]


def max_reply_bytes(stage: str, session: Session, corrections: bool = False) -> int:
    """The most bytes (as ``validation.reply_bytes`` counts them) an honest reply to
    ``stage`` can take: keys are fixed-size, shares grow with N, a masked input or a
    correction is P + 1 ring elements; plus the header slack of a plain update."""
    vector = session.vector_length * session.ring.dtype.itemsize
    peers = len(session.participants) * PEER_BYTES
    extra = {wire.ADVERTISE: 0, wire.SHARE_KEYS: peers, wire.MASK: vector, wire.CONSISTENCY: 0,
             wire.UNMASK: peers + (vector if corrections else 0)}[stage]
    return HEADER_SLACK_BYTES + extra


@dataclass(frozen=True)
class SecureSettings:
    clip: float = 0.05          # per-coordinate bound on an organization's delta
    max_weight: int = 10_000    # the largest example count that counts (larger ones are capped)
    threshold: int = 0          # shares to unmask; 0 or below ⌊N/2⌋+1: ⌊N/2⌋+1
    prg: str = DEFAULT_PRG
    survivor_corrections: bool = True   # after dropouts, survivors remove their masks with the dropped
    #: the smallest threshold offered (up to N): organizations refuse a t below their session
    #: floor (clients/secure_aggregation.py; 3 by default), so 3 organizations get t = 3
    min_threshold: int = 3


@dataclass
class SecureOutcome:
    accepted: list[int] = field(default_factory=list)            # node ids whose input is in the sum
    rejected: list[tuple[int, str, str]] = field(default_factory=list)   # (node, reason, detail)
    timed_out: list[int] = field(default_factory=list)
    weight_sum: int = 0
    error_bound: float = 0.0   # per coordinate, vs the exact mean of the clipped inputs (plain path's)
    failure: str = ""                                            # why there is no aggregate, if there is none


@dataclass
class _Attempt:
    """What the stages of one attempt share."""

    server_round: int
    nodes: list[int]                      # the sampled node ids, sorted
    session: Session
    coordinator: SecAggCoordinator
    expectation: codec.Expectation        # what a plain update's header would have to say this round
    notify: ReplyObserver
    outcome: SecureOutcome = field(default_factory=SecureOutcome)
    silent: set[int] = field(default_factory=set)             # missed a deadline at some stage
    masked_digests: set[bytes] = field(default_factory=set)   # of the masked inputs summed so far
    index: dict[int, int] = field(init=False)                 # node id -> its index in the session
    node_of: dict[int, int] = field(init=False)               # and back

    def __post_init__(self) -> None:
        self.index = {node: i + 1 for i, node in enumerate(self.nodes)}
        self.node_of = {i: node for node, i in self.index.items()}

    @property
    def session_id(self) -> bytes:
        return self.session.session_id

    def nodes_at(self, indices: Iterable[int]) -> list[int]:
        """The node ids of session indices, in their order."""
        return [self.node_of[i] for i in indices]

    def own_index(self, node: int, claimed: int) -> int:
        """``claimed`` if it is the index ``node`` was given."""
        if claimed != self.index[node]:
            raise SecAggError(f"claims index {claimed}, was given {self.index[node]}")
        return claimed


class SecureRound:
    """Runs the four exchanges of one attempt and feeds the strategy."""

    def __init__(self, grid: Grid, settings: SecureSettings, *, timeout: float, poll_interval: float,
                 late: LateReplies | None = None, node_name: Callable[[int], str] = str,
                 ttl: float | None = None) -> None:
        self.grid, self.settings = grid, settings
        self.timeout, self.poll_interval, self.late = timeout, poll_interval, late
        self.node_name = node_name
        self.ttl = ttl if ttl is not None else timeout + 60

    def session_for(self, job_id: str, server_round: int, nodes: list[int], reference: Adapter,
                    secure_input: SecureInput = SecureInput()) -> Session:
        n = len(nodes)
        threshold = max(self.settings.threshold, Session.default_threshold(n), min(n, self.settings.min_threshold))
        if threshold > n:
            raise SecAggError(f"secagg-threshold {self.settings.threshold} exceeds the {n} sampled organizations")
        session_id = (struct.pack("<I", server_round) + os.urandom(16) + job_id.encode())[:64]
        length = sum(int(np.prod(shape)) for _, shape in layout_of(reference))
        return Session(session_id, tuple(range(1, n + 1)), threshold, self._ring(n, length, secure_input),
                       length, self.settings.prg)

    def _ring(self, n: int, length: int, secure_input: SecureInput) -> RingSpec:
        if not secure_input.uniform:
            return RingSpec.derive(n, self.settings.clip, self.settings.max_weight)
        # DP-FedAvg: a delta of L2 norm <= C has every coordinate within ±C, so C is the
        # per-coordinate clip (secagg-clip does not apply) and nothing clipped to C is cut
        # again; weight 1 each (max weight 1: the session says so to every organization)
        clip = secure_input.clip_norm
        try:
            ring = RingSpec.derive(n, clip, 1)
        except SecAggError as err:
            raise SecAggError(f"dp clip_norm {clip} for {n} organizations does not fit a secure-aggregation "
                              f"ring: {err}") from None
        if ring.rounding_norm(length) >= clip:
            raise SecAggError(
                f"dp clip_norm {clip} does not fit a {ring.ring_bits}-bit ring for {n} organizations and "
                f"{length} values: rounding to steps of 2^-{ring.frac_bits} alone can move an update by "
                f"{ring.rounding_norm(length):.3g}; fewer organizations per round or a smaller adapter")
        return ring

    def run(self, *, job_id: str, server_round: int, sampled: list[int], train_content: RecordDict,
            reference: Adapter, strategy: Strategy, expectation: codec.Expectation,
            on_reply: ReplyObserver | None = None) -> SecureOutcome:
        """``reference``: the global adapter over the shared factors (what deltas are taken from).
        ``expectation``: what a plain update's header would have to say this round.
        ``on_reply(node, reply, accepted, detail)`` sees every verified or refused reply."""
        try:
            secure_input = strategy.secure_input()
        except AggregationError as err:
            return SecureOutcome(failure=str(err))
        attempt = self._begin(job_id, server_round, sampled, reference, secure_input, expectation, on_reply)
        try:
            roster = self._advertise(attempt)
            routing = self._share_keys(attempt, roster)
            survivors, dropped = self._mask(attempt, routing, train_content)
            signatures = self._consistency(attempt, survivors, dropped) if attempt.coordinator.signed else None
            result = self._unmask(attempt, survivors, dropped, signatures)
        except SecAggError as err:   # ThresholdError included: no aggregate this attempt
            return self._no_aggregate(attempt, err)
        return self._finish(attempt, result, reference, strategy, secure_input)

    # ---- the steps of ``run``, in order ------------------------------------------
    def _begin(self, job_id: str, server_round: int, sampled: list[int], reference: Adapter,
               secure_input: SecureInput, expectation: codec.Expectation,
               on_reply: ReplyObserver | None) -> _Attempt:
        """The session (indices 1..N in node id order) and its coordinator."""
        nodes = sorted(sampled)
        session = self.session_for(job_id, server_round, nodes, reference, secure_input)
        coordinator = SecAggCoordinator(session, self.settings.survivor_corrections,
                                        name=lambda i: f"{self.node_name(nodes[i - 1])} (index {i})")
        return _Attempt(server_round, nodes, session, coordinator, expectation, on_reply or (lambda *_: None))

    def _advertise(self, attempt: _Attempt) -> dict[int, PublicKeys]:
        """Stage 1: each sampled organization gets the session and its index and
        answers with two public keys; the roster U1 is those that did."""
        self._exchange(attempt, wire.ADVERTISE, attempt.nodes,
                       lambda node: _instruction(wire.advertise_instruction(attempt.session, attempt.index[node])),
                       _keys_reply)
        return attempt.coordinator.roster()

    def _share_keys(self, attempt: _Attempt, roster: dict[int, PublicKeys]) -> dict[int, dict[int, bytes]]:
        """Stage 2: the roster goes to U1 (one content for all); each answers with
        Shamir shares sealed for every other member. Returns, per member of U2
        (those that answered), the sealed shares addressed to it."""
        content = _instruction(wire.share_keys_instruction(attempt.session_id, roster))
        self._exchange(attempt, wire.SHARE_KEYS, attempt.nodes_at(roster), lambda node: content, _shares_reply)
        return attempt.coordinator.routing()

    def _mask(self, attempt: _Attempt, routing: dict[int, dict[int, bytes]],
              train_content: RecordDict) -> tuple[list[int], list[int]]:
        """Stage 3: each member of U2 gets the train instruction plus the shares
        sealed for it, trains and answers with its masked input, which the
        coordinator adds to the running sum and drops. Returns (survivors U3,
        dropped U2 \\ U3)."""
        coordinator = attempt.coordinator

        def content_for(node: int) -> RecordDict:
            index = attempt.index[node]
            return _mask_content(train_content, attempt.session_id, routing[index], coordinator.commitments_for(index))

        self._exchange(attempt, wire.MASK, attempt.nodes_at(routing), content_for, _masked_reply, large=True)
        return coordinator.unmask_request()

    def _consistency(self, attempt: _Attempt, survivors: list[int], dropped: list[int]) -> dict[int, bytes]:
        """Stage 4, signed sessions only: each survivor signs the survivor and dropped
        sets; the signers (at least t) are the ones asked to unmask, and each of them
        sees every signature, so that none reveals shares for sets that others did not see."""
        content = _instruction(wire.consistency_instruction(attempt.session_id, survivors, dropped))
        self._exchange(attempt, wire.CONSISTENCY, attempt.nodes_at(survivors), lambda node: content,
                       _consistency_reply)
        return attempt.coordinator.consistency_signatures()

    def _unmask(self, attempt: _Attempt, survivors: list[int], dropped: list[int],
                signatures: dict[int, bytes] | None = None) -> SecAggResult:
        """Stage 5: the survivors (the signers, in a signed session) learn who survived and
        who dropped and answer with the shares that remove the masks (and, when asked,
        their correction); a reply with a share that is not the one its dealer committed
        to is refused by name, and the coordinator unmasks the sum from the others."""
        corrections = attempt.coordinator.asks_corrections
        content = _instruction(wire.unmask_instruction(attempt.session_id, survivors, dropped, corrections,
                                                       signatures))
        targets = sorted(signatures) if signatures is not None else survivors
        self._exchange(attempt, wire.UNMASK, attempt.nodes_at(targets), lambda node: content, _unmask_reply,
                       large=corrections)   # then each reply carries P values
        return attempt.coordinator.finish()

    def _no_aggregate(self, attempt: _Attempt, err: SecAggError) -> SecureOutcome:
        """A stage fell below the threshold or the sum did not unmask: no update this attempt."""
        attempt.outcome.failure = f"secure aggregation: {err}"
        attempt.outcome.timed_out = sorted(attempt.silent)
        log.warning("round %d: %s", attempt.server_round, attempt.outcome.failure)
        return attempt.outcome

    def _finish(self, attempt: _Attempt, result: SecAggResult, reference: Adapter, strategy: Strategy,
                secure_input: SecureInput) -> SecureOutcome:
        """Hand the unmasked mean to the strategy: global + mean delta, or under
        DP-FedAvg the sum of the clipped deltas."""
        outcome, session = attempt.outcome, attempt.session
        layout = layout_of(reference)
        count = len(result.survivors)
        try:
            if secure_input.uniform:
                if result.weight_sum != count:   # each organization masks weight 1
                    raise AggregationError(f"secure aggregation: the weights sum to {result.weight_sum} for {count} "
                                           "organization(s); a DP round counts each once")
                strategy.accumulate_secure_sum(_sum_of(result.mean, layout, count), count)
            else:
                delta = unflatten(result.mean, layout)
                mean = {name: (reference[name].astype(np.float64) + delta[name]).astype(np.float32) for name in delta}
                strategy.accumulate_secure(mean, result.weight_sum, count)
        except AggregationError as err:
            outcome.failure = str(err)
            return outcome
        outcome.accepted = attempt.nodes_at(result.survivors)
        outcome.timed_out = sorted(attempt.silent)
        outcome.weight_sum = result.weight_sum
        # uniform: each input was also clipped to C less the ring's rounding (clients/secure_aggregation.py)
        outcome.error_bound = result.error_bound + (
            session.ring.rounding_norm(session.length) if secure_input.uniform else 0.0)
        log.info("round %d: secure aggregate of %d organization(s) (%d dropped after masking), total weight %d, "
                 "quantization error <= %.3g", attempt.server_round, len(result.survivors), len(result.dropped),
                 result.weight_sum, outcome.error_bound)
        return outcome

    # ---- one exchange ------------------------------------------------------------
    def _exchange(self, attempt: _Attempt, stage: str, targets: list[int], content_for: Callable[[int], RecordDict],
                  handle: Callable[[_Attempt, int, Message], None], large: bool = False) -> None:
        """One stage's exchange; ``large``: replies of P values (pulled a few at a time).
        Who misses the deadline is remembered in ``attempt.silent``."""
        admission = UpdateValidator(max_reply_bytes(stage, attempt.session, large and stage == wire.UNMASK),
                                    f"the session's bound for {stage} replies")
        admission.begin_round(attempt.server_round)
        messages = [Message(content=content_for(node), dst_node_id=node, message_type=MessageType.TRAIN,
                            ttl=self.ttl) for node in targets]
        batch = {} if large else {"pull_batch": SMALL_PULL_BATCH}
        on_reply = functools.partial(_on_reply, attempt, stage, admission, handle)
        result = exchange(self.grid, messages, on_reply, timeout=self.timeout, poll_interval=self.poll_interval,
                          late=self.late, **batch, what=f"the round {attempt.server_round} secure-aggregation {stage}",
                          node_name=self.node_name)
        attempt.silent.update(result.timed_out)


def _on_reply(attempt: _Attempt, stage: str, admission: UpdateValidator,
              handle: Callable[[_Attempt, int, Message], None], node: int, reply: Message) -> None:
    """One reply to ``stage``: admitted (sender, once per stage, size) before it is
    parsed, then handled; one that fails is refused with its reason and detail."""
    try:
        admission.admit(node, reply)
        if reply.has_error():
            raise UpdateRejected(RejectReason.CLIENT_ERROR,
                                 f"the organization failed at {stage}: {reply.error.reason}")
        handle(attempt, node, reply)
    except (UpdateRejected, SecAggError) as err:
        reason, detail = ((err.reason, err.detail) if isinstance(err, UpdateRejected)
                          else (RejectReason.SECURE_AGGREGATION, str(err)))
        attempt.outcome.rejected.append((node, reason.value, f"{stage}: {detail}"))
        attempt.notify(node, reply, False, f"{stage}: {detail}")


# ---- the instructions ----------------------------------------------------------------
def _instruction(record: ConfigRecord) -> RecordDict:
    return RecordDict({wire.SECAGG_RECORD: record})


def _mask_content(train_content: RecordDict, session_id: bytes, sealed_for_node: dict[int, bytes],
                  commitments: dict[int, tuple[bytes, bytes]]) -> RecordDict:
    """The train instruction plus the shares sealed for this node and their dealers'
    commitments; the train instruction's records are shared, not copied."""
    content = RecordDict(dict(train_content.items()))
    content[wire.SECAGG_RECORD] = wire.mask_instruction(session_id, sealed_for_node, commitments)
    return content


# ---- the replies, one handler per stage ------------------------------------------------
def _keys_reply(attempt: _Attempt, node: int, reply: Message) -> None:
    claimed, public = wire.parse_advertise_reply(reply.content, attempt.session_id)
    attempt.coordinator.add_keys(attempt.own_index(node, claimed), public)


def _shares_reply(attempt: _Attempt, node: int, reply: Message) -> None:
    claimed, shares = wire.parse_share_keys_reply(reply.content, attempt.session_id)
    attempt.coordinator.add_shares(attempt.own_index(node, claimed), shares)


def _masked_reply(attempt: _Attempt, node: int, reply: Message) -> None:
    check_secure_header(wire.parse_masked_header(reply.content), attempt.expectation)
    claimed, vector = wire.parse_mask_reply(reply.content, attempt.session_id)
    attempt.own_index(node, claimed)
    ring, length = attempt.session.ring, attempt.session.vector_length
    if vector.dtype != ring.dtype:
        raise UpdateRejected(RejectReason.TENSOR_DTYPE, f"masked input {vector.dtype}, ring {ring.dtype}")
    if vector.shape != (length,):
        raise UpdateRejected(RejectReason.TENSOR_SHAPE, f"masked input {vector.shape}, expected ({length},)")
    # an honest masked input is uniform: a byte-identical one is a copy (a free rider),
    # which would break the sum; refused, it counts as a dropout and the sum unmasks
    digest = hashlib.sha256(memoryview(np.ascontiguousarray(vector)).cast("B")).digest()
    if digest in attempt.masked_digests:
        raise UpdateRejected(RejectReason.DUPLICATE, "the same masked input as another organization's")
    attempt.coordinator.add_masked(claimed, vector)
    attempt.masked_digests.add(digest)
    attempt.notify(node, reply, True, "masked input summed")


def _consistency_reply(attempt: _Attempt, node: int, reply: Message) -> None:
    claimed, signature = wire.parse_consistency_reply(reply.content, attempt.session_id)
    attempt.coordinator.add_consistency(attempt.own_index(node, claimed), signature)


def _unmask_reply(attempt: _Attempt, node: int, reply: Message) -> None:
    claimed, shares = wire.parse_unmask_reply(reply.content, attempt.session_id)
    attempt.coordinator.add_unmask(attempt.own_index(node, claimed), shares)


def _sum_of(mean: np.ndarray, layout: Layout, count: int) -> Adapter:
    """The sum (float64 tensors) from the unmasked mean of ``count`` inputs of weight 1."""
    out: Adapter = {}
    offset = 0
    for name, shape in layout:
        size = math.prod(shape)
        out[name] = (mean[offset:offset + size].astype(np.float64) * count).reshape(shape)
        offset += size
    return out
