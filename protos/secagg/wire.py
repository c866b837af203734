"""Secure-aggregation messages as Flower records.

A secure round is four exchanges of TRAIN messages, five in a signed session
(server/secure_aggregation/round.py drives them, clients/secure_aggregation.py
answers). Each message, both ways, carries a ConfigRecord ``SECAGG_RECORD``
with the protocol version, the stage name, the session id and the stage's
fields (lists of ints and bytes); the masked input travels as a uint32/uint64 Array in the ArrayRecord
``MASKED_RECORD``. The stage-3 instruction also carries the ordinary train
instruction (the encoded global adapter and the round config), so an
organization trains only once the key exchange has succeeded.

The masked input comes with the update's header (the codec's
``HEADER_RECORD``) reduced to what describes the round and not the data
(``masked_header``): protocol version, job, round, base-model fingerprint,
adapter config, tensor names, shapes and logical dtypes. No example count, no
metrics, no encoding scale (an int8 scale is a tensor's largest value). The
coordinator checks it as it checks a plain update's header.

Every ``parse_*`` raises SecAggError on anything missing, mistyped or from
another session: a reply that does not parse is a dropout, never a crash.

Protocol versions (``PROTOCOL_VERSION``, in every record both ways; a message
of another version is refused by name, both sides being in this repository):

* 1 — honest-but-curious coordinator: keys unsigned, no share commitments.
* 2 — against a malicious coordinator: the advertise reply carries the
  organization's identity (its node key) and signature, and the share-keys
  instruction passes them on; the share-keys reply commits to every share dealt
  (``committed``, ``seed_share_commitments``, ``key_share_commitments``) and
  the mask instruction passes each holder the commitments to its shares; the
  ``consistency`` stage (signed sessions only) collects signatures of the
  survivor and dropped sets, which the unmask instruction carries
  (``signers``, ``signatures``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from protos import codec
from protos.codec import wire_view   # read-only view over the message bytes, no copy
from protos.errors import RejectReason, UpdateRejected
from protos.secagg.errors import SecAggError
from protos.secagg.identity import MAX_IDENTITY_BYTES, MAX_SIGNATURE_BYTES
from protos.secagg.messages import PublicKeys, SealedShares, UnmaskShares
from protos.secagg.session import Session

PROTOCOL_VERSION = 2
COMMITMENT_BYTES = 32

SECAGG_RECORD = "silotune.secagg"
MASKED_RECORD = "silotune.secagg.masked"
CORRECTION_RECORD = "silotune.secagg.correction"   # a survivor's masks with the dropped, when asked
#: the organization's protocol state, in its own context.state (never sent)
STATE_RECORD = "silotune.secagg.state"

ADVERTISE, SHARE_KEYS, MASK, CONSISTENCY, UNMASK = "advertise", "share-keys", "mask", "consistency", "unmask"
STAGES = (ADVERTISE, SHARE_KEYS, MASK, CONSISTENCY, UNMASK)


def is_secagg(content: RecordDict) -> bool:
    return SECAGG_RECORD in content.config_records


def _record(stage: str, session_id: bytes, **fields: Any) -> ConfigRecord:
    return ConfigRecord({"version": PROTOCOL_VERSION, "stage": stage, "session_id": session_id, **fields})


def stage_of(content: RecordDict) -> tuple[str, bytes, ConfigRecord]:
    """(stage, session id, the record) of a secure-aggregation message."""
    try:
        record = content.config_records[SECAGG_RECORD]
        stage, session_id = record["stage"], record["session_id"]
    except KeyError as missing:
        raise SecAggError(f"secure-aggregation record without {missing}") from None
    version = record.get("version", 1)
    if version != PROTOCOL_VERSION:
        raise SecAggError(f"secure-aggregation protocol version {version!r}; this side speaks {PROTOCOL_VERSION}")
    if stage not in STAGES or not isinstance(session_id, bytes):
        raise SecAggError(f"unknown secure-aggregation stage {stage!r}")
    return str(stage), session_id, record


def _get(record: ConfigRecord, key: str, kind: type) -> Any:
    value = record.get(key)
    if kind is list:
        if value is None:
            return []       # an absent list is an empty one
        if not isinstance(value, list):
            raise SecAggError(f"field {key!r} is not a list")
        return value
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise SecAggError(f"field {key!r} missing or not {kind.__name__}")
    return value


def _ints(record: ConfigRecord, key: str) -> list[int]:
    values = _get(record, key, list)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise SecAggError(f"field {key!r} must hold integers")
    return [int(v) for v in values]


def _bytes_list(record: ConfigRecord, key: str, length: int, size: int | None = None,
                max_size: int | None = None) -> list[bytes]:
    """``size``: each exactly that long; ``max_size``: each at most that long."""
    values = _get(record, key, list)
    if len(values) != length or not all(isinstance(v, bytes) for v in values):
        raise SecAggError(f"field {key!r} must hold {length} byte strings")
    if size is not None and any(len(v) != size for v in values):
        raise SecAggError(f"field {key!r} must hold byte strings of {size} bytes")
    if max_size is not None and any(len(v) > max_size for v in values):
        raise SecAggError(f"field {key!r} holds a value over {max_size} bytes")
    return list(values)


def _short_bytes(record: ConfigRecord, key: str, max_size: int) -> bytes:
    value = _get(record, key, bytes)
    if len(value) > max_size:
        raise SecAggError(f"field {key!r} is over {max_size} bytes")
    return value


def _expect(record_stage: str, session_id: bytes, stage: str, session: bytes) -> None:
    if record_stage != stage:
        raise SecAggError(f"a {record_stage!r} message where {stage!r} was expected")
    if session_id != session:
        raise SecAggError("a message from another secure-aggregation session")


# ---- stage 1: advertise keys -------------------------------------------------
def advertise_instruction(session: Session, index: int) -> ConfigRecord:
    return _record(ADVERTISE, session.session_id, session=session.to_json(), index=index)


def parse_advertise_instruction(record: ConfigRecord) -> tuple[Session, int]:
    return Session.from_json(_get(record, "session", str)), _get(record, "index", int)


def advertise_reply(session_id: bytes, index: int, keys: PublicKeys) -> ConfigRecord:
    """``keys.identity`` and ``keys.signature`` are empty for an organization without a node key."""
    return _record(ADVERTISE, session_id, index=index, mask=keys.mask, encryption=keys.encryption,
                   identity=keys.identity, signature=keys.signature)


def parse_advertise_reply(content: RecordDict, session_id: bytes) -> tuple[int, PublicKeys]:
    stage, sid, record = stage_of(content)
    _expect(stage, sid, ADVERTISE, session_id)
    return _get(record, "index", int), PublicKeys(
        _get(record, "mask", bytes), _get(record, "encryption", bytes),
        _short_bytes(record, "identity", MAX_IDENTITY_BYTES), _short_bytes(record, "signature", MAX_SIGNATURE_BYTES))


# ---- stage 2: share keys -----------------------------------------------------
def share_keys_instruction(session_id: bytes, roster: dict[int, PublicKeys]) -> ConfigRecord:
    members = sorted(roster)
    return _record(SHARE_KEYS, session_id, members=members, masks=[roster[i].mask for i in members],
                   encryptions=[roster[i].encryption for i in members],
                   identities=[roster[i].identity for i in members],
                   signatures=[roster[i].signature for i in members])


def parse_share_keys_instruction(record: ConfigRecord) -> dict[int, PublicKeys]:
    members = _ints(record, "members")
    masks = _bytes_list(record, "masks", len(members))
    encryptions = _bytes_list(record, "encryptions", len(members))
    identities = _bytes_list(record, "identities", len(members), max_size=MAX_IDENTITY_BYTES)
    signatures = _bytes_list(record, "signatures", len(members), max_size=MAX_SIGNATURE_BYTES)
    return {i: PublicKeys(m, e, d, g) for i, m, e, d, g in zip(members, masks, encryptions, identities, signatures)}


def share_keys_reply(session_id: bytes, index: int, shares: SealedShares) -> ConfigRecord:
    holders, committed = sorted(shares.sealed), sorted(shares.share_commitments)
    return _record(SHARE_KEYS, session_id, index=index, holders=holders,
                   sealed=[shares.sealed[j] for j in holders], commitment=shares.seed_commitment,
                   committed=committed,
                   seed_share_commitments=[shares.share_commitments[j][0] for j in committed],
                   key_share_commitments=[shares.share_commitments[j][1] for j in committed])


def parse_share_keys_reply(content: RecordDict, session_id: bytes) -> tuple[int, SealedShares]:
    stage, sid, record = stage_of(content)
    _expect(stage, sid, SHARE_KEYS, session_id)
    holders = _ints(record, "holders")
    sealed = _bytes_list(record, "sealed", len(holders))
    committed = _ints(record, "committed")
    seed_c = _bytes_list(record, "seed_share_commitments", len(committed), size=COMMITMENT_BYTES)
    key_c = _bytes_list(record, "key_share_commitments", len(committed), size=COMMITMENT_BYTES)
    return _get(record, "index", int), SealedShares(dict(zip(holders, sealed)), _get(record, "commitment", bytes),
                                                    dict(zip(committed, zip(seed_c, key_c))))


# ---- stage 3: masked input ---------------------------------------------------
def mask_instruction(session_id: bytes, sealed_for_me: dict[int, bytes],
                     commitments_for_me: dict[int, tuple[bytes, bytes]] | None = None) -> ConfigRecord:
    """``commitments_for_me``: per source, its published commitments to the two shares it sealed here."""
    sources = sorted(sealed_for_me)
    fields: dict[str, Any] = {"sources": sources, "sealed": [sealed_for_me[j] for j in sources]}
    if commitments_for_me is not None:
        fields["seed_share_commitments"] = [commitments_for_me[j][0] for j in sources]
        fields["key_share_commitments"] = [commitments_for_me[j][1] for j in sources]
    return _record(MASK, session_id, **fields)


def parse_mask_instruction(record: ConfigRecord) -> dict[int, bytes]:
    sources = _ints(record, "sources")
    return dict(zip(sources, _bytes_list(record, "sealed", len(sources))))


def parse_mask_commitments(record: ConfigRecord) -> dict[int, tuple[bytes, bytes]]:
    """Per source, the commitments it published to the shares it sealed for this organization."""
    sources = _ints(record, "sources")
    seed_c = _bytes_list(record, "seed_share_commitments", len(sources), size=COMMITMENT_BYTES)
    key_c = _bytes_list(record, "key_share_commitments", len(sources), size=COMMITMENT_BYTES)
    return dict(zip(sources, zip(seed_c, key_c)))


def masked_header(update_header: codec.UpdateHeader) -> bytes:
    """The header a masked input carries: the update's, without what describes its data."""
    header = codec.UpdateHeader(
        protocol_version=update_header.protocol_version, kind=update_header.kind, job_id=update_header.job_id,
        round=update_header.round, base_model_fingerprint=update_header.base_model_fingerprint,
    )
    header.adapter.CopyFrom(update_header.adapter)
    for spec in update_header.tensors:
        header.tensors.add(name=spec.name, shape=list(spec.shape), dtype=spec.dtype)
    return header.SerializeToString()


def parse_masked_header(content: RecordDict) -> codec.UpdateHeader:
    """The masked input's header; UpdateRejected (MALFORMED, PROTOCOL_VERSION) as the codec names them."""
    record = content.config_records.get(codec.HEADER_RECORD)
    raw = record.get("bytes") if record is not None else None
    if not isinstance(raw, bytes):
        raise UpdateRejected(RejectReason.MALFORMED, f"masked input without its header ({codec.HEADER_RECORD})")
    return codec.parse_header(raw)


def mask_reply(session_id: bytes, index: int, vector: np.ndarray, header: bytes | None = None) -> RecordDict:
    """``header``: ``masked_header`` of the update (the coordinator of a round requires it)."""
    reply = RecordDict({
        SECAGG_RECORD: _record(MASK, session_id, index=index),
        MASKED_RECORD: ArrayRecord({"masked": Array(vector)}),
    })
    if header is not None:
        reply[codec.HEADER_RECORD] = ConfigRecord({"bytes": header})
    return reply


def parse_mask_reply(content: RecordDict, session_id: bytes) -> tuple[int, np.ndarray]:
    stage, sid, record = stage_of(content)
    _expect(stage, sid, MASK, session_id)
    try:
        vector = wire_view(content.array_records[MASKED_RECORD]["masked"])
    except Exception as err:  # a corrupt Array must not crash the round
        raise SecAggError(f"masked input does not deserialize: {err}") from None
    return _get(record, "index", int), vector


# ---- stage 4 (signed sessions): consistency -----------------------------------
def consistency_instruction(session_id: bytes, survivors: list[int], dropped: list[int]) -> ConfigRecord:
    return _record(CONSISTENCY, session_id, survivors=survivors, dropped=dropped)


def parse_consistency_instruction(record: ConfigRecord) -> tuple[list[int], list[int]]:
    return _ints(record, "survivors"), _ints(record, "dropped")


def consistency_reply(session_id: bytes, index: int, signature: bytes) -> ConfigRecord:
    return _record(CONSISTENCY, session_id, index=index, signature=signature)


def parse_consistency_reply(content: RecordDict, session_id: bytes) -> tuple[int, bytes]:
    stage, sid, record = stage_of(content)
    _expect(stage, sid, CONSISTENCY, session_id)
    return _get(record, "index", int), _short_bytes(record, "signature", MAX_SIGNATURE_BYTES)


# ---- stage 5: unmask ---------------------------------------------------------
def unmask_instruction(session_id: bytes, survivors: list[int], dropped: list[int],
                       corrections: bool = False, signatures: dict[int, bytes] | None = None) -> ConfigRecord:
    """``signatures``: signed sessions, the consistency signatures (signer index → signature)."""
    signers = sorted(signatures or {})
    return _record(UNMASK, session_id, survivors=survivors, dropped=dropped, corrections=int(corrections),
                   signers=signers, signatures=[(signatures or {})[i] for i in signers])


def parse_unmask_instruction(record: ConfigRecord) -> tuple[list[int], list[int], bool]:
    """(survivors, dropped, whether a correction is asked for)."""
    return _ints(record, "survivors"), _ints(record, "dropped"), bool(_get(record, "corrections", int))


def parse_unmask_signatures(record: ConfigRecord) -> dict[int, bytes]:
    """The consistency signatures the unmask instruction carries (empty in an unsigned session)."""
    signers = _ints(record, "signers")
    return dict(zip(signers, _bytes_list(record, "signatures", len(signers), max_size=MAX_SIGNATURE_BYTES)))


def unmask_reply(session_id: bytes, index: int, shares: UnmaskShares) -> RecordDict:
    seeds, keys = sorted(shares.seed), sorted(shares.mask_key)
    reply = RecordDict({SECAGG_RECORD: _record(
        UNMASK, session_id, index=index, seed_owners=seeds, seed_shares=[shares.seed[i] for i in seeds],
        key_owners=keys, key_shares=[shares.mask_key[i] for i in keys])})
    if shares.correction is not None:
        reply[CORRECTION_RECORD] = ArrayRecord({"correction": Array(shares.correction)})
    return reply


def parse_unmask_reply(content: RecordDict, session_id: bytes) -> tuple[int, UnmaskShares]:
    stage, sid, record = stage_of(content)
    _expect(stage, sid, UNMASK, session_id)
    seeds, keys = _ints(record, "seed_owners"), _ints(record, "key_owners")
    correction = None
    if CORRECTION_RECORD in content.array_records:
        try:
            correction = wire_view(content.array_records[CORRECTION_RECORD]["correction"])
        except Exception as err:  # a corrupt Array must not crash the round
            raise SecAggError(f"correction does not deserialize: {err}") from None
    return _get(record, "index", int), UnmaskShares(
        seed=dict(zip(seeds, _bytes_list(record, "seed_shares", len(seeds)))),
        mask_key=dict(zip(keys, _bytes_list(record, "key_shares", len(keys)))),
        correction=correction,
    )
