"""UpdateValidator on its own: size bound, one reply per node, duplicates, replays, retries."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from protos.errors import RejectReason, UpdateRejected
from server.job_config import JobConfig, JobConfigError
from server.validation import HEADER_SLACK_BYTES, UpdateValidator, derived_max_update_bytes, reply_bytes, update_digest

TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def reply_from(node: int, content: RecordDict | None = None, src: int | None = None) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    reply = Message(content if content is not None else RecordDict(), reply_to=instruction)
    if src is not None:
        reply.metadata.__dict__["_src_node_id"] = src
    return reply


def rejected(reason: RejectReason, call, *args) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UpdateRejected) as caught:
        call(*args)
    assert caught.value.reason is reason, caught.value


def test_derived_bound_is_twice_fp32_plus_slack() -> None:
    layout = {"a": (4, 64), "b": (64, 4)}
    assert derived_max_update_bytes(layout) == 2 * 4 * 512 + HEADER_SLACK_BYTES


def test_size_counts_every_record_before_decoding() -> None:
    content = RecordDict({"t": ArrayRecord(array_dict={"x": Array(np.zeros(1000, "<f4"))}, keep_input=True),
                          "c": ConfigRecord({"blob": b"\0" * 500, "name": "abc"})})
    assert reply_bytes(content) >= 4000 + 500 + 3
    validator = UpdateValidator(4000)
    validator.begin_round(1)
    rejected(RejectReason.OVERSIZED, validator.admit, 5, reply_from(5, content))
    UpdateValidator(10_000).admit(5, reply_from(5, content))


def test_one_reply_per_node_and_only_from_the_node_asked() -> None:
    validator = UpdateValidator(10_000)
    validator.begin_round(1)
    validator.admit(1, reply_from(1))
    rejected(RejectReason.DUPLICATE, validator.admit, 2, reply_from(2, src=1))   # node 1 again
    rejected(RejectReason.MALFORMED, validator.admit, 3, reply_from(3, src=99))  # never asked
    error = Message(Error(code=1, reason="boom"), reply_to=Message(RecordDict(), dst_node_id=4, message_type="train"))
    validator.admit(4, error)                                                  # an error reply counts as its reply
    rejected(RejectReason.DUPLICATE, validator.admit, 5, reply_from(5, src=4))


def test_an_accepted_update_is_not_accepted_twice_nor_replayed_next_round() -> None:
    update = {"a": np.ones((2, 2), np.float32)}
    other = {"a": np.full((2, 2), 2.0, np.float32)}
    validator = UpdateValidator(10_000)
    validator.begin_round(1)
    validator.accepted(validator.check_fresh(update))
    rejected(RejectReason.DUPLICATE, validator.check_fresh, {"a": update["a"].copy()})
    validator.begin_round(2)
    rejected(RejectReason.DUPLICATE, validator.check_fresh, update)            # round 1's, under round 2
    validator.accepted(validator.check_fresh(other))
    validator.begin_round(2)                                                   # a retry of round 2 starts afresh
    validator.accepted(validator.check_fresh(other))
    validator.admit(1, reply_from(1))
    validator.begin_round(4)                                                   # round 3 skipped: nothing carried
    validator.check_fresh(other)
    assert update_digest(update) != update_digest({"b": update["a"]})


def test_max_update_bytes_key() -> None:
    assert JobConfig.from_run_config({"max-update-bytes": 123}).max_update_bytes == 123
    with pytest.raises(JobConfigError, match="max-update-bytes"):
        JobConfig.from_run_config({"max-update-bytes": -1})
