"""An organization's answers to the four secure-aggregation exchanges
(the stages, and where the coordinator's side lives: server/secure_aggregation/;
the messages and the protocol steps themselves: protos/secagg/).

The ClientApp sends every TRAIN message that carries a secure-aggregation
record here (clients/app.py). The protocol state — private keys, the shares
held for others — lives in this node's own ``context.state`` between
messages (a ClientApp process may not outlive one message) and is deleted
once the organization has answered the unmask request.

At the mask stage the organization trains exactly as in a plain round
(``train``: clients/round_work.py, in process or on the resident trainer,
DP clipping included), then, instead of sending the update, takes its
delta from the global over the shared factors, quantizes and masks it
(protos/secagg/client.py) and sends only the masked vector and a header that
says which round and model it belongs to (``wire.masked_header``): no example
count, no per-organization metrics. An example count above the session's max
weight counts as the max weight.

Under DP-FedAvg (the round config's ``dp_clip`` C > 0; ``dp_noise`` is 0: the
coordinator adds the noise once, to the sum) each organization counts once:
it masks its delta with weight 1, not its example count, after clipping it
to C less the ring's rounding (``RingSpec.rounding_norm``), so what enters the
sum has L2 norm at most C whatever the data: DP-FedAvg's sensitivity.
"""

from __future__ import annotations

import logging
from typing import Callable

from flwr.app import ConfigRecord, RecordDict

import numpy as np

from protos import codec
from protos.records import CONFIG_RECORD, ORG_RECORD
from protos.round_config import RoundConfig
from protos.secagg import MaskingClient, RingSpec, SecAggError, wire
from protos.secagg.layout import flatten, layout_of

log = logging.getLogger("silotune.client")

_NORM_CHUNK = 1 << 16         # float64 scratch of 512 KiB for the norm


def is_secure(content: RecordDict) -> bool:
    return wire.is_secagg(content)


def _load(state: RecordDict, session_id: bytes) -> MaskingClient:
    record = state.config_records.get(wire.STATE_RECORD)
    if record is None:
        raise SecAggError("no secure-aggregation session in progress at this organization")
    client = MaskingClient.restore(dict(record))
    if client.session.session_id != session_id:
        raise SecAggError("a message for another secure-aggregation session than the one in progress")
    return client


def _save(state: RecordDict, client: MaskingClient) -> None:
    state[wire.STATE_RECORD] = ConfigRecord(client.export_state())


def handle(content: RecordDict, state: RecordDict, train: Callable[[RecordDict], RecordDict]) -> RecordDict:
    """The reply to one secure-aggregation instruction (raises SecAggError if it does not verify)."""
    stage, session_id, record = wire.stage_of(content)
    if stage == wire.ADVERTISE:
        session, index = wire.parse_advertise_instruction(record)
        client = MaskingClient(session, index)
        reply = RecordDict({wire.SECAGG_RECORD: wire.advertise_reply(session_id, index, client.advertise())})
        _save(state, client)
        return reply
    client = _load(state, session_id)
    if stage == wire.SHARE_KEYS:
        shares = client.share_keys(wire.parse_share_keys_instruction(record))
        reply = RecordDict({wire.SECAGG_RECORD: wire.share_keys_reply(session_id, client.index, shares)})
    elif stage == wire.MASK:
        reply = _mask(client, content, wire.parse_mask_instruction(record), train)
    else:
        survivors, dropped, correction = wire.parse_unmask_instruction(record)
        reply = wire.unmask_reply(session_id, client.index, client.unmask(survivors, dropped, correction))
        del state[wire.STATE_RECORD]   # done: the keys and held shares are not needed any more
        return reply
    _save(state, client)
    return reply


def _mask(client: MaskingClient, content: RecordDict, sealed: dict[int, bytes],
          train: Callable[[RecordDict], RecordDict]) -> RecordDict:
    trained = train(content)
    header, update = codec.decode(trained)
    _, global_adapter = codec.decode(content)
    try:
        reference = {name: global_adapter[name] for name in update}
        layout = layout_of(reference)
        # float64: the DP bound below is checked on the very values that are quantized
        delta = flatten(update, layout).astype(np.float64) - flatten(reference, layout)
    except (KeyError, ValueError) as err:
        raise SecAggError(f"the update does not match the global adapter's shared factors: {err}") from None
    ring = client.session.ring
    record = content.config_records.get(CONFIG_RECORD)
    dp_clip = RoundConfig.from_record(record).dp_clip if record is not None else 0.0
    if dp_clip > 0:
        weight = 1
        delta = _clip_for_ring(delta, dp_clip, ring)
    else:
        weight = int(header.num_examples)
        if weight > ring.max_weight:
            log.warning("%d examples count as the session's max weight %d", weight, ring.max_weight)
            weight = ring.max_weight
        clipped = int((abs(delta) > ring.clip).sum())
        if clipped:
            log.warning("%d of %d delta values beyond ±%g are clipped (secagg-clip)", clipped, delta.size, ring.clip)
    vector = client.mask(sealed, delta, weight)
    reply = wire.mask_reply(client.session.session_id, client.index, vector, wire.masked_header(header))
    if ORG_RECORD in trained.config_records:
        reply[ORG_RECORD] = trained.config_records[ORG_RECORD]
    return reply


def _clip_for_ring(delta: np.ndarray, clip_norm: float, ring: RingSpec) -> np.ndarray:
    """``delta`` scaled to L2 norm at most C − the ring's rounding, so that once
    quantized it still has norm at most C (DP-FedAvg's bound on one organization)."""
    if ring.max_weight != 1:
        # the coordinator would read an input of weight 1 as 1/max_weight of one organization
        raise SecAggError(f"a DP round must count each organization once (ring max weight 1), "
                          f"the session says {ring.max_weight}")
    bound = clip_norm - ring.rounding_norm(delta.size)
    if bound <= 0:
        raise SecAggError(f"dp clip {clip_norm} does not fit the session's ring: rounding {delta.size} values "
                          f"to steps of {ring.step:.3g} alone can move them by {ring.rounding_norm(delta.size):.3g}")
    # chunked pairwise sums, not BLAS: the same delta gives the same bits on any machine
    norm = float(np.sqrt(sum(float(np.add.reduce(np.square(delta[i:i + _NORM_CHUNK])))
                             for i in range(0, delta.size, _NORM_CHUNK))))
    if norm > bound:
        delta *= bound / norm
    return delta
