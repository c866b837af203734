"""UpdateValidator on its own: size bound, one reply per node, duplicates, replays, retries;
metrics and evaluate replies; organization names (claims, enrollment); network text."""

from __future__ import annotations

import numpy as np
import pytest
import json
import math
from dataclasses import asdict
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from protos.errors import RejectReason, UpdateRejected
from server.job_config import JobConfig, JobConfigError
from server.validation import (
    HEADER_SLACK_BYTES,
    MAX_METRICS,
    OrganizationNames,
    UpdateValidator,
    check_evaluate_reply,
    check_metrics,
    derived_max_update_bytes,
    enrolled_names_from_env,
    network_text,
    reply_bytes,
    update_digest,
)

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


def test_max_weight_key() -> None:
    assert JobConfig.from_run_config({}).max_weight == 10000
    assert JobConfig.from_run_config({"max-weight": 100}).max_weight == 100
    with pytest.raises(JobConfigError, match="max-weight"):
        JobConfig.from_run_config({"max-weight": 0})


# ---- metrics and evaluate replies ----------------------------------------------------

def test_metrics_are_finite_scalars_within_bounds() -> None:
    ok = {"num_examples": 4, "loss": 0.0, "accuracy": 1.0, "perplexity": 1.0, "resident_pid": 1234.0, "delta": -3.0}
    assert check_metrics(ok) == {k: float(v) for k, v in ok.items()}
    for bad, reason in [({"loss": float("nan")}, RejectReason.NON_FINITE),
                        ({"accuracy": float("-inf")}, RejectReason.NON_FINITE),
                        ({"num_examples": 10**400}, RejectReason.NON_FINITE),          # beyond a float
                        ({"loss": [1.0, 2.0]}, RejectReason.METRIC_VALUE),
                        ({"loss": "1.0"}, RejectReason.METRIC_VALUE),
                        ({"loss": True}, RejectReason.METRIC_VALUE),
                        ({"loss": -1e-9}, RejectReason.METRIC_VALUE),
                        ({"train_loss": -1.0}, RejectReason.METRIC_VALUE),
                        ({"accuracy": 1.5}, RejectReason.METRIC_VALUE),
                        ({"perplexity": 0.5}, RejectReason.METRIC_VALUE),
                        ({"": 1.0}, RejectReason.MALFORMED),
                        ({"a\x1b[2J": 1.0}, RejectReason.MALFORMED),
                        ({f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}, RejectReason.MALFORMED)]:
        rejected(reason, check_metrics, bad)


def _evaluate_content(metrics: object = None, **records: object) -> RecordDict:
    content = {"metrics": MetricRecord(metrics if metrics is not None else {"num_examples": 4.0, "loss": 1.0}),
               "organization": ConfigRecord({"name": "bank-a"})}
    content.update(records)  # type: ignore[arg-type]
    return RecordDict({k: v for k, v in content.items() if v is not None})  # type: ignore[misc]


def test_evaluate_replies_hold_one_metrics_record_and_a_name() -> None:
    assert check_evaluate_reply(_evaluate_content(), 64) == {"num_examples": 4.0, "loss": 1.0}
    assert check_evaluate_reply(_evaluate_content(organization=None), 64)["num_examples"] == 4.0
    rejected(RejectReason.MALFORMED, check_evaluate_reply, RecordDict({"organization": ConfigRecord({"name": "a"})}), 64)
    rejected(RejectReason.MALFORMED, check_evaluate_reply, RecordDict(), 64)
    rejected(RejectReason.MALFORMED, check_evaluate_reply,
             RecordDict({"metrics": ConfigRecord({"num_examples": 4.0})}), 64)
    rejected(RejectReason.MALFORMED, check_evaluate_reply, _evaluate_content(extra=MetricRecord({"x": 1.0})), 64)
    rejected(RejectReason.MALFORMED, check_evaluate_reply, _evaluate_content(extra=ConfigRecord({"x": 1})), 64)
    rejected(RejectReason.MALFORMED, check_evaluate_reply,
             _evaluate_content(extra=ArrayRecord(array_dict={"x": Array(np.zeros(2, "<f4"))}, keep_input=True)), 64)


@pytest.mark.parametrize("count", [None, 0, -5, 2.5, 65, 10**12, 1e300])
def test_evaluate_example_counts_are_integers_up_to_eval_max_examples(count: object) -> None:
    metrics = {"loss": 1.0} if count is None else {"num_examples": count, "loss": 1.0}
    rejected(RejectReason.NUM_EXAMPLES, check_evaluate_reply, _evaluate_content(metrics), 64)


def test_network_text_is_printable_and_short() -> None:
    assert network_text("bank-a") == "bank-a"
    assert network_text("a\nb\x1b[31m") == "a\\nb\\x1b[31m"
    assert network_text(b"\xff") == "b'\\xff'"
    assert len(network_text("x" * 1000, 50)) == 50
    assert network_text("[/bold]") == "[/bold]"      # markup is escaped where it is printed, not here


# ---- organization names ----------------------------------------------------------------

def named(node: int, name: object) -> Message:
    return reply_from(node, RecordDict({"organization": ConfigRecord({} if name is None else {"name": name})}))


def test_a_name_is_bound_once_and_never_taken_from_another_node() -> None:
    table: dict[str, str] = {}
    names = OrganizationNames(table)
    assert names.claim(1, named(1, "bank-a")) == "bank-a"
    assert names.claim(2, named(2, "bank-a")) == "node-2"                    # taken
    assert names.claim(1, named(1, "bank-z")) == "bank-a"                    # bound: a claim never renames
    for node, bad in [(3, "node-1"), (4, "overall"), (5, ""), (6, " x"), (7, "a\nb"), (8, "x" * 129), (9, 7),
                      (10, None)]:
        assert names.claim(node, named(node, bad)) == f"node-{node}", bad
    assert names.claim(2, named(2, "bank-b")) == "bank-b"                    # a free name binds later
    assert names.claim(11, reply_from(11)) == "node-11"                      # no organization record: no claim
    assert names.claim(12, named(12, "[/bold]")) == "[/bold]"                # markup is a name like any other
    assert table == {"1": "bank-a", "2": "bank-b", "12": "[/bold]"}
    refused = names.take_refused()
    assert [(r["node"], r["claimed"]) for r in refused][:3] == [("2", "bank-a"), ("1", "bank-z"), ("3", "node-1")]
    assert names.take_refused() == []
    names.claim(2, named(2, "bank-q"))
    names.claim(2, named(2, "bank-q"))
    assert len(names.take_refused()) == 1                                    # a claim is recorded once
    again = OrganizationNames(table)                                         # resumed from a checkpoint
    assert again.claim(5, named(5, "bank-a")) == "node-5"


def test_a_name_moves_to_a_new_node_only_once_its_holder_is_offline() -> None:
    """Without enrollment a restarted organization comes back as a new node id."""
    online = {1, 2}
    table: dict[str, str] = {}
    names = OrganizationNames(table, online=lambda: online)
    assert names.claim(1, named(1, "bank-a")) == "bank-a"
    assert names.claim(2, named(2, "bank-a")) == "node-2"        # the holder is online: refused
    online.discard(1)
    assert names.claim(3, named(3, "bank-a")) == "bank-a"        # holder gone: the successor takes it
    assert table == {"3": "bank-a"} and names.name(1) == "node-1"


def test_with_enrollment_only_enrolled_names_are_used() -> None:
    registry = {1: "bank-a", 2: "bank-b"}
    loads = []

    def enrolled() -> dict[int, str]:
        loads.append(1)
        return dict(registry)

    names = OrganizationNames({}, enrolled)
    assert names.claim(1, named(1, "bank-b")) == "bank-a"
    assert names.claim(3, named(3, "bank-c")) == "node-3"                    # not enrolled: no claim binds
    assert names.name(2) == "bank-b"
    assert {r["node"] for r in names.take_refused()} == {"1", "3"}
    assert len(loads) == 1                                                    # read again at most every 2 s


def test_the_enrollment_registry_names_the_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator's registry (server/enrollment.py's file) read the way the ServerApp
    reads it under a SuperLink with node authentication; none without the variable."""
    from server.enrollment import Enrollment, registry_path
    from server.superlink import ENROLLMENT_STATE_ENV

    rows = [Enrollment("bank-a", 11, "sha256:a", "/k/a.pub", "2026-01-01T00:00:00+00:00"),
            Enrollment("bank-b", 12, "sha256:b", "/k/b.pub", "2026-01-01T00:00:00+00:00", "2026-01-02T00:00:00+00:00")]
    registry_path(tmp_path).write_text(json.dumps({"enrollments": [asdict(r) for r in rows]}))
    assert enrolled_names_from_env({}) is None
    load = enrolled_names_from_env({ENROLLMENT_STATE_ENV: str(tmp_path)})
    assert load is not None and load() == {11: "bank-a", 12: "bank-b"}
    registry_path(tmp_path).write_text("{not json")
    assert load() == {}                                                       # unreadable: nobody is named
    monkeypatch.setenv(ENROLLMENT_STATE_ENV, str(tmp_path / "none"))
    assert enrolled_names_from_env() is not None and enrolled_names_from_env()() == {}  # type: ignore[misc]


def test_a_superlink_with_node_auth_tells_the_serverapp_where_the_registry_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SuperLinkProcess puts the state dir into the environment its ServerApp processes
    inherit — only with node authentication (an --insecure node id proves nothing)."""
    import server.superlink as superlink

    started: list[dict[str, str]] = []

    class FakeProcess:
        pid = 0

        def __init__(self, cmd: list[str], **kwargs: object) -> None:
            started.append(kwargs["env"])  # type: ignore[arg-type]

        def poll(self) -> int:
            return 0

    monkeypatch.delenv(superlink.ENROLLMENT_STATE_ENV, raising=False)
    monkeypatch.setattr(superlink.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(superlink, "wait_for_port", lambda *a, **k: None)
    monkeypatch.setattr(superlink.SuperLinkProcess, "_write_connection", lambda self, insecure: None)

    class Tls:
        ca_cert = cert = key = tmp_path / "x.pem"

    for node_auth in (True, False):
        process = superlink.SuperLinkProcess()
        if node_auth:
            process.start(tmp_path / "auth", insecure=False, tls=Tls(), node_auth=True, port=1)
        else:
            process.start(tmp_path / "open", port=1)
        process.proc = None   # nothing was started
    assert started[0][superlink.ENROLLMENT_STATE_ENV] == str((tmp_path / "auth").resolve())
    assert superlink.ENROLLMENT_STATE_ENV not in started[1]
