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

Against a malicious coordinator (the whole argument: server/secure_aggregation/
__init__.py, "Secure aggregation: what it defends"), three things come from this
organization, never from the coordinator:

* its session floor, ``min_secure_session`` of its policy (clients/policy.py;
  3 by default, 2 for a simulation's virtual organizations): at advertise,
  before it makes a key, it refuses (``PolicyViolation``, rule
  ``min_secure_session``; nothing of its data is sent) a session of fewer
  organizations or with a threshold t below the floor — the coordinator can
  unmask no sum of fewer than t inputs (``Session.check_floor``);
* its node key (node config ``signing-key``: the agent's ``--private-key``),
  which signs its advertised keys and, before unmasking, the survivor set;
* the peers it trusts (node config ``trusted-peers``: a file of their public
  keys or fingerprints, distributed out of band; ``identity.TrustedPeers``):
  then every other member of the session must be signed by a distinct one of
  them, and it reveals unmask shares only for a survivor set that at least t
  of them signed. Without that file signatures are not checked — the
  coordinator could invent the other members — and the floor is the only
  defence. Virtual organizations have neither key nor file: unsigned.

Under DP-FedAvg (the round config's ``dp_clip`` C > 0; ``dp_noise`` is 0: the
coordinator adds the noise once, to the sum) each organization counts once:
it masks its delta with weight 1, not its example count, after clipping it
to C less the ring's rounding (``RingSpec.rounding_norm``), so what enters the
sum has L2 norm at most C whatever the data: DP-FedAvg's sensitivity.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, RecordDict

import numpy as np

from clients.node_config import SIGNING_KEY_KEY, TRUSTED_PEERS_KEY
from protos import codec
from protos.records import CONFIG_RECORD, ORG_RECORD
from protos.round_config import RoundConfig
from protos.secagg import MaskingClient, RingSpec, SecAggError, wire
from protos.secagg.errors import SessionRefused
from protos.secagg.identity import TrustedPeers
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


def session_floor(node_config: Mapping[str, Any]) -> int:
    """The fewest organizations (and the lowest threshold) this organization's policy accepts."""
    from clients.policy import policy_for

    return int(policy_for(node_config).min_secure_session)


def signing_key(node_config: Mapping[str, Any]) -> ec.EllipticCurvePrivateKey | None:
    """This organization's node key, if the agent named it (``signing-key``); None in simulation."""
    path = node_config.get(SIGNING_KEY_KEY)
    if not path:
        return None
    from runtime.keys import PkiError, load_org_private_key

    try:
        return load_org_private_key(str(path))
    except PkiError as err:
        raise SecAggError(f"node config {SIGNING_KEY_KEY}: {err}") from None


_PEERS: dict[tuple[str, float], TrustedPeers] = {}


def load_trusted_peers(path: str | Path) -> TrustedPeers:
    """The roster file: one peer per line, its OpenSSH public key (ORG.pub) or ``SHA256:`` fingerprint."""
    path = Path(path).expanduser()
    try:
        stamp = path.stat().st_mtime
        key = (str(path), stamp)
        if key not in _PEERS:
            _PEERS[key] = TrustedPeers.parse(path.read_text(encoding="utf-8"), source=str(path))
    except (OSError, UnicodeDecodeError) as err:
        raise SecAggError(f"trusted peers file {path} cannot be read: {err}") from None
    return _PEERS[key]


def trusted_peers(node_config: Mapping[str, Any]) -> TrustedPeers | None:
    """The peers this organization pins (``trusted-peers``), or None: signatures not checked."""
    path = node_config.get(TRUSTED_PEERS_KEY)
    return load_trusted_peers(str(path)) if path else None


def handle(content: RecordDict, state: RecordDict, train: Callable[[RecordDict], RecordDict],
           node_config: Mapping[str, Any] | None = None) -> RecordDict:
    """The reply to one secure-aggregation instruction (raises SecAggError if it does not verify,
    PolicyViolation if this organization's policy refuses the session).

    ``node_config``: this node's (the policy's floor, the node key, the trusted peers); None: {}."""
    node_config = node_config if node_config is not None else {}
    stage, session_id, record = wire.stage_of(content)
    if stage == wire.ADVERTISE:
        session, index = wire.parse_advertise_instruction(record)
        _check_floor(session, node_config)   # before anything is made or sent
        client = MaskingClient(session, index, signer=signing_key(node_config))
        reply = RecordDict({wire.SECAGG_RECORD: wire.advertise_reply(session_id, index, client.advertise())})
        _save(state, client)
        return reply
    client = _load(state, session_id)
    if stage == wire.SHARE_KEYS:
        shares = client.share_keys(wire.parse_share_keys_instruction(record), trusted_peers(node_config))
        reply = RecordDict({wire.SECAGG_RECORD: wire.share_keys_reply(session_id, client.index, shares)})
    elif stage == wire.MASK:
        reply = _mask(client, content, wire.parse_mask_instruction(record), wire.parse_mask_commitments(record),
                      train)
    elif stage == wire.CONSISTENCY:
        survivors, dropped = wire.parse_consistency_instruction(record)
        signature = client.consistency(survivors, dropped, signing_key(node_config))
        reply = RecordDict({wire.SECAGG_RECORD: wire.consistency_reply(session_id, client.index, signature)})
    else:
        survivors, dropped, correction = wire.parse_unmask_instruction(record)
        shares = client.unmask(survivors, dropped, correction, wire.parse_unmask_signatures(record),
                               trusted_peers(node_config))
        reply = wire.unmask_reply(session_id, client.index, shares)
        del state[wire.STATE_RECORD]   # done: the keys and held shares are not needed any more
        return reply
    _save(state, client)
    return reply


def _check_floor(session: Any, node_config: Mapping[str, Any]) -> None:
    from clients.policy import PolicyViolation

    floor = session_floor(node_config)
    try:
        session.check_floor(floor)
    except SessionRefused as refusal:
        log.warning("secure aggregation: refused a session: %s", refusal)
        raise PolicyViolation("min_secure_session", str(refusal)) from None


def _mask(client: MaskingClient, content: RecordDict, sealed: dict[int, bytes],
          commitments: dict[int, tuple[bytes, bytes]], train: Callable[[RecordDict], RecordDict]) -> RecordDict:
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
    vector = client.mask(sealed, delta, weight, commitments)
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
