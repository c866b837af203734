"""One round attempt under secure aggregation: four exchanges instead of one.

1. advertise — each sampled organization gets the session (its index,
   the participants, threshold t, ring, P, PRG) and answers with two public keys;
2. share keys — the roster of keys goes to those that answered; each answers
   with Shamir shares sealed for every other member;
3. mask — each member of U2 gets the usual train instruction (encoded global,
   round config) plus the sealed shares addressed to it; it trains, masks its
   delta (update − global over the shared factors) and answers with the masked
   ring vector, which the coordinator adds to a running sum and drops;
4. unmask — the survivors answer with the shares that remove the masks and,
   after dropouts, the sum of their own masks shared with the dropped ones
   (so the coordinator expands N + (survivors without one)·d masks, not N + d·(N−d)).

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
bounds them. A replay from another round or attempt fails its header or its
session id (both sides bind every message to the session).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from protos import codec
from protos.adapter import Adapter
from protos.errors import RejectReason, UpdateRejected
from protos.secagg import RingSpec, SecAggError, Session, wire
from protos.secagg.layout import Layout, layout_of, unflatten
from protos.secagg.prg import DEFAULT_PRG
from server.exchange import LateReplies, exchange
from server.secagg import SecAggCoordinator
from server.validation import HEADER_SLACK_BYTES, UpdateValidator, check_secure_header
from strategies import AggregationError, Strategy
from strategies.base import SecureInput

log = logging.getLogger("silotune.server")

#: replies pulled at once in the key, share and unmask exchanges (a few KiB each)
SMALL_PULL_BATCH = 64
#: what a share-keys or unmask reply carries per other organization, with room to
#: spare: an index and a sealed pair of shares (160 bytes), or one share (66 bytes)
PEER_BYTES = 256


def max_reply_bytes(stage: str, session: Session, corrections: bool = False) -> int:
    """The most bytes (as ``validation.reply_bytes`` counts them) an honest reply to
    ``stage`` can take: keys are fixed-size, shares grow with N, a masked input or a
    correction is P + 1 ring elements; plus the header slack of a plain update."""
    vector = session.vector_length * session.ring.dtype.itemsize
    peers = len(session.participants) * PEER_BYTES
    extra = {wire.ADVERTISE: 0, wire.SHARE_KEYS: peers, wire.MASK: vector,
             wire.UNMASK: peers + (vector if corrections else 0)}[stage]
    return HEADER_SLACK_BYTES + extra


@dataclass(frozen=True)
class SecureSettings:
    clip: float = 0.05          # per-coordinate bound on an organization's delta
    max_weight: int = 10_000    # the largest example count that counts (larger ones are capped)
    threshold: int = 0          # shares to unmask; 0 or below ⌊N/2⌋+1: ⌊N/2⌋+1
    prg: str = DEFAULT_PRG
    survivor_corrections: bool = True   # after dropouts, survivors remove their masks with the dropped


@dataclass
class SecureOutcome:
    accepted: list[int] = field(default_factory=list)            # node ids whose input is in the sum
    rejected: list[tuple[int, str, str]] = field(default_factory=list)   # (node, reason, detail)
    timed_out: list[int] = field(default_factory=list)
    weight_sum: int = 0
    error_bound: float = 0.0   # per coordinate, vs the exact mean of the clipped inputs (plain path's)
    failure: str = ""                                            # why there is no aggregate, if there is none


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
        threshold = max(self.settings.threshold, Session.default_threshold(n))
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
            on_reply: Callable[[int, Message | None, bool, str], None] | None = None) -> SecureOutcome:
        """``reference``: the global adapter over the shared factors (what deltas are taken from).
        ``expectation``: what a plain update's header would have to say this round.
        ``on_reply(node, reply, accepted, detail)`` sees every verified or refused reply."""
        outcome = SecureOutcome()
        try:
            secure_input = strategy.secure_input()
        except AggregationError as err:
            outcome.failure = str(err)
            return outcome
        nodes = sorted(sampled)
        index = {node: i + 1 for i, node in enumerate(nodes)}
        node_of = {i: node for node, i in index.items()}
        session = self.session_for(job_id, server_round, nodes, reference, secure_input)
        sid = session.session_id
        coordinator = SecAggCoordinator(session, self.settings.survivor_corrections)
        silent: set[int] = set()
        notify = on_reply or (lambda *_: None)

        def stage(name: str, targets: list[int], content_for: Callable[[int], RecordDict],
                  handle: Callable[[int, Message], None], large: bool = False) -> None:
            """One exchange; ``large``: replies of P values (pulled a few at a time)."""
            admission = UpdateValidator(max_reply_bytes(name, session, large and name == wire.UNMASK),
                                        f"the session's bound for {name} replies")
            admission.begin_round(server_round)

            def on_message(node: int, reply: Message) -> None:
                try:
                    admission.admit(node, reply)   # sender, once per stage, size: before parsing
                    if reply.has_error():
                        raise UpdateRejected(RejectReason.CLIENT_ERROR,
                                             f"the organization failed at {name}: {reply.error.reason}")
                    handle(node, reply)
                except (UpdateRejected, SecAggError) as err:
                    reason, detail = ((err.reason, err.detail) if isinstance(err, UpdateRejected)
                                      else (RejectReason.SECURE_AGGREGATION, str(err)))
                    outcome.rejected.append((node, reason.value, f"{name}: {detail}"))
                    notify(node, reply, False, f"{name}: {detail}")

            messages = [Message(content=content_for(node), dst_node_id=node, message_type=MessageType.TRAIN,
                                ttl=self.ttl) for node in targets]
            batch = {} if large else {"pull_batch": SMALL_PULL_BATCH}
            result = exchange(self.grid, messages, on_message, timeout=self.timeout,
                              poll_interval=self.poll_interval, late=self.late, **batch,
                              what=f"the round {server_round} secure-aggregation {name}", node_name=self.node_name)
            silent.update(result.timed_out)

        def own_index(node: int, claimed: int) -> int:
            if claimed != index[node]:
                raise SecAggError(f"claims index {claimed}, was given {index[node]}")
            return claimed

        try:
            # 1: advertise keys
            stage(wire.ADVERTISE, nodes,
                  lambda node: RecordDict({wire.SECAGG_RECORD: wire.advertise_instruction(session, index[node])}),
                  lambda node, reply: coordinator.add_keys(
                      own_index(node, (parsed := wire.parse_advertise_reply(reply.content, sid))[0]), parsed[1]))
            roster = coordinator.roster()
            # 2: share keys (one content for all)
            share_content = RecordDict({wire.SECAGG_RECORD: wire.share_keys_instruction(sid, roster)})
            stage(wire.SHARE_KEYS, [node_of[i] for i in roster], lambda node: share_content,
                  lambda node, reply: coordinator.add_shares(
                      own_index(node, (parsed := wire.parse_share_keys_reply(reply.content, sid))[0]), parsed[1]))
            routing = coordinator.routing()

            # 3: train and mask; the train instruction's records are shared, not copied
            def mask_content(node: int) -> RecordDict:
                content = RecordDict(dict(train_content.items()))
                content[wire.SECAGG_RECORD] = wire.mask_instruction(sid, routing[index[node]])
                return content

            seen: set[bytes] = set()

            def masked(node: int, reply: Message) -> None:
                check_secure_header(wire.parse_masked_header(reply.content), expectation)
                claimed, vector = wire.parse_mask_reply(reply.content, sid)
                own_index(node, claimed)
                ring = session.ring
                if vector.dtype != ring.dtype:
                    raise UpdateRejected(RejectReason.TENSOR_DTYPE, f"masked input {vector.dtype}, ring {ring.dtype}")
                if vector.shape != (session.vector_length,):
                    raise UpdateRejected(RejectReason.TENSOR_SHAPE,
                                         f"masked input {vector.shape}, expected ({session.vector_length},)")
                # an honest masked input is uniform: a byte-identical one is a copy (a free rider),
                # which would break the sum; refused, it counts as a dropout and the sum unmasks
                digest = hashlib.sha256(memoryview(np.ascontiguousarray(vector)).cast("B")).digest()
                if digest in seen:
                    raise UpdateRejected(RejectReason.DUPLICATE, "the same masked input as another organization's")
                coordinator.add_masked(claimed, vector)
                seen.add(digest)
                notify(node, reply, True, "masked input summed")

            stage(wire.MASK, [node_of[i] for i in routing], mask_content, masked, large=True)
            survivors, dropped = coordinator.unmask_request()
            # 4: unmask
            unmask_content = RecordDict({wire.SECAGG_RECORD: wire.unmask_instruction(
                sid, survivors, dropped, coordinator.asks_corrections)})
            stage(wire.UNMASK, [node_of[i] for i in survivors], lambda node: unmask_content,
                  lambda node, reply: coordinator.add_unmask(
                      own_index(node, (parsed := wire.parse_unmask_reply(reply.content, sid))[0]), parsed[1]),
                  large=coordinator.asks_corrections)   # then each reply carries P values
            result = coordinator.finish()
        except SecAggError as err:   # ThresholdError included: no aggregate this attempt
            outcome.failure = f"secure aggregation: {err}"
            outcome.timed_out = sorted(silent)
            log.warning("round %d: %s", server_round, outcome.failure)
            return outcome

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
        outcome.accepted = [node_of[i] for i in result.survivors]
        outcome.timed_out = sorted(silent)
        outcome.weight_sum = result.weight_sum
        # uniform: each input was also clipped to C less the ring's rounding (clients/secure_round.py)
        outcome.error_bound = result.error_bound + (
            session.ring.rounding_norm(session.length) if secure_input.uniform else 0.0)
        log.info("round %d: secure aggregate of %d organization(s) (%d dropped after masking), total weight %d, "
                 "quantization error <= %.3g", server_round, len(result.survivors), len(result.dropped),
                 result.weight_sum, outcome.error_bound)
        return outcome


def _sum_of(mean: np.ndarray, layout: Layout, count: int) -> Adapter:
    """The sum (float64 tensors) from the unmasked mean of ``count`` inputs of weight 1."""
    out: Adapter = {}
    offset = 0
    for name, shape in layout:
        size = math.prod(shape)
        out[name] = (mean[offset:offset + size].astype(np.float64) * count).reshape(shape)
        offset += size
    return out
