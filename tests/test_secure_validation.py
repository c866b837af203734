"""What a secure round checks, with the plain round's named reasons.

Every reply at every stage: from the node it was sent to, no larger than the
stage allows (before parsing). A masked input: its header (protocol version,
job, round, base model, adapter, tensor names and shapes), the ring's dtype
and length, not a copy of another organization's, not from another session.
A rejected input is a dropout: its masks are removed and the round's sum is
that of the others. The masked values themselves are not checked: they are
uniform ring elements. Scripted organizations (tests/test_secure_round.py).
"""

from __future__ import annotations

import copy

import re
from typing import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from protos import codec
from protos.secagg import wire
from test_secure_round import SHAPES, SecureGrid, _plain, _run

NODES = [1, 2, 3, 4, 5]   # t = 3: the round survives one or two rejections


def _grid() -> SecureGrid:
    return SecureGrid({n: 0.001 * n for n in NODES}, {n: 10 * n for n in NODES})


def _tamper(grid: SecureGrid, stage: str, node: int, change: Callable[[Message, dict], None]) -> dict:
    """Apply ``change(reply, seen)`` to ``node``'s reply at ``stage``; ``seen``: copies of the
    content of earlier replies at it."""
    real_pull = grid.pull_messages
    seen: dict = {}

    def pull(ids):  # type: ignore[no-untyped-def]
        replies = list(real_pull(ids))
        for reply in replies:
            if wire.stage_of(reply.content)[0] != stage:
                continue
            sender = reply.metadata.src_node_id
            if sender == node:
                change(reply, seen)
            # a snapshot: the round loop empties each reply's arrays once handled, and on the
            # wire a copied masked input is a separate, byte-identical object anyway
            seen[sender] = copy.deepcopy(reply.content)
        return replies

    grid.pull_messages = pull  # type: ignore[method-assign]
    return seen


def _header_change(**fields) -> Callable[[Message, dict], None]:
    def change(reply: Message, _: dict) -> None:
        record = reply.content.config_records[codec.HEADER_RECORD]
        header = codec.UpdateHeader()
        header.ParseFromString(record["bytes"])
        for key, value in fields.items():
            if key == "shape":
                header.tensors[0].shape[0] += 1
            elif key == "dtype":
                header.tensors[0].dtype = value
            else:
                setattr(header, key, value)
        record["bytes"] = header.SerializeToString()
    return change


def _drop_header(reply: Message, _: dict) -> None:
    del reply.content[codec.HEADER_RECORD]


def _masked(values: Callable[[np.ndarray], np.ndarray]) -> Callable[[Message, dict], None]:
    def change(reply: Message, _: dict) -> None:
        vector = reply.content.array_records[wire.MASKED_RECORD]["masked"].numpy()
        reply.content[wire.MASKED_RECORD] = ArrayRecord({"masked": Array(values(vector))})
    return change


def _copy_of_2(reply: Message, seen: dict) -> None:
    reply.content[wire.MASKED_RECORD] = seen[2].array_records[wire.MASKED_RECORD]


@pytest.mark.parametrize("change,reason,detail", [
    (_header_change(round=7), "wrong_round", "round 7, expected 1"),
    (_header_change(job_id="other"), "wrong_job", "job 'other'"),
    (_header_change(base_model_fingerprint="x"), "base_model_mismatch", "base model 'x'"),
    (_header_change(protocol_version=1), "protocol_version", "protocol 1"),
    (_header_change(shape=True), "tensor_shape", "m.lora_A.weight: (5, 12)"),
    (_header_change(dtype="bfloat16"), "tensor_dtype", "logical dtype 'bfloat16'"),
    (_drop_header, "malformed", "masked input without its header"),
    (_masked(lambda v: v.astype(np.uint64)), "tensor_dtype", "masked input uint64"),
    (_masked(lambda v: v[:-1]), "tensor_shape", "masked input (144,)"),
    (_copy_of_2, "duplicate", "the same masked input as another organization's"),
])
def test_a_bad_masked_input_is_rejected_by_name_and_the_round_goes_on(change, reason, detail):
    grid = _grid()
    _tamper(grid, wire.MASK, 4, change)
    outcome, strategy, global_adapter = _run(grid)
    assert outcome.failure == "" and outcome.accepted == [1, 2, 3, 5]
    assert [(node, why) for node, why, _ in outcome.rejected] == [(4, reason)]
    assert outcome.rejected[0][2].startswith("mask: ") and detail in outcome.rejected[0][2]
    secure = strategy.finish_round()   # 4 trained and masked; its masks were removed, its input is not in
    plain = _plain(grid, [1, 2, 3, 5], global_adapter)
    for name in SHAPES:
        np.testing.assert_allclose(secure[name], plain[name], rtol=0, atol=outcome.error_bound + 1e-7)


def test_every_stage_checks_the_sender_and_the_size_before_parsing():
    grid = _grid()

    def other_sender(reply: Message, _: dict) -> None:
        reply.metadata.__dict__["_src_node_id"] = 99

    def padded(reply: Message, _: dict) -> None:
        reply.content["padding"] = ConfigRecord({"x": b"\0" * 100_000})   # an advertise reply is a few KiB

    _tamper(grid, wire.ADVERTISE, 2, padded)
    _tamper(grid, wire.SHARE_KEYS, 3, other_sender)   # wraps the first hook
    outcome, _, _ = _run(grid)
    assert outcome.failure == "" and outcome.accepted == [1, 4, 5]
    rejected = sorted(outcome.rejected)
    assert [(node, why) for node, why, _ in rejected] == [(2, "oversized"), (3, "malformed")]
    assert re.fullmatch(r"advertise: 1\d{5} bytes, at most 65536 \(the session's bound for advertise replies\)",
                        rejected[0][2])
    assert rejected[1][2] == "share-keys: a reply from node 99 to the instruction sent to node 3"


def test_a_masked_input_replayed_from_another_attempt_is_refused():
    """Same job, same round, another session (a retried attempt): the header passes, the session id does not."""
    first = _grid()
    kept = _tamper(first, wire.MASK, 0, lambda *_: None)
    _run(first)
    old = kept[4]
    grid = _grid()

    def replay(reply: Message, _: dict) -> None:
        for name in (wire.SECAGG_RECORD, wire.MASKED_RECORD, codec.HEADER_RECORD):
            reply.content[name] = old[name]

    _tamper(grid, wire.MASK, 4, replay)
    outcome, _, _ = _run(grid)
    assert outcome.accepted == [1, 2, 3, 5]
    assert outcome.rejected == [(4, "secure_aggregation", "mask: a message from another secure-aggregation session")]
