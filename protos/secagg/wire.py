"""Secure-aggregation messages as Flower records.

A secure round is four exchanges of TRAIN messages
(server/secure_aggregation/round.py drives them, clients/secure_aggregation.py
answers). Each message, both ways, carries a ConfigRecord ``SECAGG_RECORD``
with the stage name, the session id and the stage's fields (lists of ints and
bytes); the masked input travels as a uint32/uint64 Array in the ArrayRecord
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
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from protos import codec
from protos.codec import wire_view   # read-only view over the message bytes, no copy
from protos.errors import RejectReason, UpdateRejected
from protos.secagg.errors import SecAggError
from protos.secagg.messages import PublicKeys, SealedShares, UnmaskShares
from protos.secagg.session import Session

SECAGG_RECORD = "silotune.secagg"
MASKED_RECORD = "silotune.secagg.masked"
CORRECTION_RECORD = "silotune.secagg.correction"   # a survivor's masks with the dropped, when asked
#: the organization's protocol state, in its own context.state (never sent)
STATE_RECORD = "silotune.secagg.state"

ADVERTISE, SHARE_KEYS, MASK, UNMASK = "advertise", "share-keys", "mask", "unmask"
STAGES = (ADVERTISE, SHARE_KEYS, MASK, UNMASK)


def is_secagg(content: RecordDict) -> bool:
    return SECAGG_RECORD in content.config_records


def _record(stage: str, session_id: bytes, **fields: Any) -> ConfigRecord:
    return ConfigRecord({"stage": stage, "session_id": session_id, **fields})


def stage_of(content: RecordDict) -> tuple[str, bytes, ConfigRecord]:
    """(stage, session id, the record) of a secure-aggregation message."""
    try:
        record = content.config_records[SECAGG_RECORD]
        stage, session_id = record["stage"], record["session_id"]
    except KeyError as missing:
        raise SecAggError(f"secure-aggregation record without {missing}") from None
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


def _bytes_list(record: ConfigRecord, key: str, length: int) -> list[bytes]:
    values = _get(record, key, list)
    if len(values) != length or not all(isinstance(v, bytes) for v in values):
        raise SecAggError(f"field {key!r} must hold {length} byte strings")
    return list(values)


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
    return _record(ADVERTISE, session_id, index=index, mask=keys.mask, encryption=keys.encryption)


def parse_advertise_reply(content: RecordDict, session_id: bytes) -> tuple[int, PublicKeys]:
    stage, sid, record = stage_of(content)
    _expect(stage, sid, ADVERTISE, session_id)
    return _get(record, "index", int), PublicKeys(_get(record, "mask", bytes), _get(record, "encryption", bytes))


# ---- stage 2: share keys -----------------------------------------------------
def share_keys_instruction(session_id: bytes, roster: dict[int, PublicKeys]) -> ConfigRecord:
    members = sorted(roster)
    return _record(SHARE_KEYS, session_id, members=members, masks=[roster[i].mask for i in members],
                   encryptions=[roster[i].encryption for i in members])


def parse_share_keys_instruction(record: ConfigRecord) -> dict[int, PublicKeys]:
    members = _ints(record, "members")
    masks = _bytes_list(record, "masks", len(members))
    encryptions = _bytes_list(record, "encryptions", len(members))
    return {i: PublicKeys(m, e) for i, m, e in zip(members, masks, encryptions)}


def share_keys_reply(session_id: bytes, index: int, shares: SealedShares) -> ConfigRecord:
    holders = sorted(shares.sealed)
    return _record(SHARE_KEYS, session_id, index=index, holders=holders,
                   sealed=[shares.sealed[j] for j in holders], commitment=shares.seed_commitment)


def parse_share_keys_reply(content: RecordDict, session_id: bytes) -> tuple[int, SealedShares]:
    stage, sid, record = stage_of(content)
    _expect(stage, sid, SHARE_KEYS, session_id)
    holders = _ints(record, "holders")
    sealed = _bytes_list(record, "sealed", len(holders))
    return _get(record, "index", int), SealedShares(dict(zip(holders, sealed)), _get(record, "commitment", bytes))


# ---- stage 3: masked input ---------------------------------------------------
def mask_instruction(session_id: bytes, sealed_for_me: dict[int, bytes]) -> ConfigRecord:
    sources = sorted(sealed_for_me)
    return _record(MASK, session_id, sources=sources, sealed=[sealed_for_me[j] for j in sources])


def parse_mask_instruction(record: ConfigRecord) -> dict[int, bytes]:
    sources = _ints(record, "sources")
    return dict(zip(sources, _bytes_list(record, "sealed", len(sources))))


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


# ---- stage 4: unmask ---------------------------------------------------------
def unmask_instruction(session_id: bytes, survivors: list[int], dropped: list[int],
                       corrections: bool = False) -> ConfigRecord:
    return _record(UNMASK, session_id, survivors=survivors, dropped=dropped, corrections=int(corrections))


def parse_unmask_instruction(record: ConfigRecord) -> tuple[list[int], list[int], bool]:
    """(survivors, dropped, whether a correction is asked for)."""
    return _ints(record, "survivors"), _ints(record, "dropped"), bool(_get(record, "corrections", int))


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
