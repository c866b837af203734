"""Privacy audit: nothing an organization sends holds its records or their token ids.

A real 2-round job (tiny-llama, FedAvg) runs with two organizations, each the
real ClientApp (clients/app.py → clients/round_work.py: silo loading, split,
tokenization, training, evaluation) on its own silo file — a BBC News
classification silo and a construction-law Q&A silo. Between the coordinator
and each ClientApp sits a wire: every instruction and every reply is turned
into Flower's protobuf Message (``message_to_proto``), as the SuperNode sends
it, and back. Each reply's serialized bytes are captured — the whole of what
the organization sent: header, tensors, metrics, organization record, errors.

The audit then searches every captured message (the checker is tests/privacy_checks.py,
shared with the audit of a real deployment's traffic, tests/test_privacy_audit_deployment.py) for

* **record text** — every 20-byte window (UTF-8; latin-1 text is the same
  bytes) of every raw field of both silo files (article text, question,
  answer) and of every example as the trainer sees it (prompt, answer);
* **token-id sequences** — every window of 8 consecutive token ids of every
  example, tokenized as the trainer does it (prompt + answer with the chat
  template, truncated to max-length) and as plain text, written as
  little-endian uint16, int32, int64 and float32 at any byte offset; and, in
  the decoded records, any 8 consecutive numbers of a config/metric list or of
  an Array equal to such a window (protobuf varints would hide the ids from a
  byte search);
* **per-example metrics** — every metric must be a single number, never a list.

A negative control proves the checker is not blind: replies that leak a
record's text (in a ConfigRecord) or its token ids (as an int64 Array, as
uint16 bytes at an odd offset, as a MetricRecord list) are caught by the same
functions, while the captured honest replies are not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # type: ignore[attr-defined]
from privacy_checks import ID_WINDOW, Secrets, content_record_leaks, leaks, record_leaks, silo_secrets
from test_round_loop import ScriptedGrid, config

from clients.app import app as client_app
from clients.silo.corpora import load_bbc_news, load_construction_faq
from runtime.base_model import load_tokenizer
from protos import codec
from protos.adapter import LoraSpec
from protos.errors import UpdateRejected
from protos.records import HEADER_RECORD, TENSORS_RECORD
from server.job import Job

ROWS = 24              # records per silo
MAX_LENGTH = 96


# ---- the silos and what must never leave them ------------------------------------------

def write_silos(folder: Path) -> dict[str, Path]:
    news = load_bbc_news()[:ROWS]
    faq = load_construction_faq("en")[:ROWS]
    paths = {"newsroom": folder / "newsroom.jsonl", "law-firm": folder / "law-firm.jsonl"}
    paths["newsroom"].write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in news))
    paths["law-firm"].write_text("".join(json.dumps({"instruction": q, "response": a}) + "\n" for q, a, _ in faq))
    return paths


# ---- a run with every organization message captured -------------------------------------

@dataclass
class Sent:
    org: str
    kind: str
    raw: bytes


def wire(message: Message) -> tuple[Message, bytes]:
    """A message as the other side receives it: through Flower's protobuf."""
    raw = message_to_proto(message).SerializeToString()
    return message_from_proto(ProtoMessage.FromString(raw)), raw


def organization(name: str, node_id: int, silo: Path, outbox: list[Sent]) -> Any:
    context = Context(run_id=1, node_id=node_id, node_config={"silo-path": str(silo), "org-name": name},
                      state=RecordDict(), run_config={})

    def handle(instruction: Message) -> Message:
        received, _ = wire(instruction)
        reply = client_app(received, context)          # the real ClientApp
        delivered, raw = wire(reply)
        outbox.append(Sent(name, instruction.metadata.message_type, raw))
        return delivered
    return handle


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Sent], Secrets, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("privacy")
    silos = write_silos(folder)
    outbox: list[Sent] = []
    grid = ScriptedGrid({node: organization(name, node, path, outbox)
                         for node, (name, path) in enumerate(sorted(silos.items()), start=1)})
    cfg = config(folder / "run", job_id="privacy-audit", num_rounds=2, min_nodes=2, round_timeout=300.0,
                 local_steps=2, batch_size=4, max_length=MAX_LENGTH, eval_max_examples=4, learning_rate=5e-3)
    final = Job(grid, cfg).run()
    secrets = silo_secrets(silos.values(), load_tokenizer("tiny-llama"), MAX_LENGTH)
    return outbox, secrets, final.run_state


def test_the_run_was_real_and_every_message_was_captured(audited_run: Any) -> None:
    outbox, secrets, run_state = audited_run
    history = run_state["history"]
    assert [h["round"] for h in history] == [0, 1, 2]
    assert all(sorted(h["accepted"]) == ["law-firm", "newsroom"] for h in history[1:])
    # per organization: 3 evaluations (rounds 0, 1, 2) and 2 trainings
    kinds = sorted((s.org, s.kind) for s in outbox)
    assert kinds == sorted([(org, "evaluate") for org in ("law-firm", "newsroom") for _ in range(3)]
                           + [(org, "train") for org in ("law-firm", "newsroom") for _ in range(2)])
    train = [s for s in outbox if s.kind == "train"]
    assert all(len(s.raw) > 8 * 256 * 4 for s in train), "train replies must carry the adapter tensors (8 x 256 fp32)"
    assert len(secrets.text) > 10_000 and len(secrets.id_tuples) > 2_000 and secrets.sources >= 4 * ROWS


def test_no_record_text_and_no_token_ids_leave_an_organization(audited_run: Any) -> None:
    outbox, secrets, _ = audited_run
    found = {f"{s.org}/{s.kind}#{i}": leaks(s.raw, secrets) for i, s in enumerate(outbox)}
    assert not any(found.values()), {k: v for k, v in found.items() if v}


def test_the_checker_catches_a_deliberate_leak(audited_run: Any) -> None:
    """Negative control: the same checker flags replies that do leak."""
    outbox, secrets, _ = audited_run
    honest = next(s for s in outbox if s.kind == "train" and s.org == "law-firm")
    base = message_from_proto(ProtoMessage.FromString(honest.raw))
    assert leaks(honest.raw, secrets) == []

    tokenizer = load_tokenizer("tiny-llama")
    faq = load_construction_faq("en")[:ROWS]
    question, answer, _ = faq[3]
    ids = np.asarray(tokenizer(answer, add_special_tokens=False).input_ids)
    assert len(ids) >= ID_WINDOW + 4

    def leaky(**records: Any) -> bytes:
        content = RecordDict({name: base.content[name] for name in base.content})
        for name, record in records.items():
            content[name] = record
        message = Message(content, reply_to=_instruction_for(base))
        return message_to_proto(message).SerializeToString()

    text_piece = answer[len(answer) // 3 : len(answer) // 3 + 25]
    cases = {
        "text in a ConfigRecord": leaky(note=ConfigRecord({"why": f"see: {text_piece}"})),
        "token ids as an int64 Array": leaky(extra=ArrayRecord(array_dict={"ids": Array(ids[2:14].astype("<i8"))},
                                                               keep_input=True)),
        "token ids as uint16 bytes at an odd offset": leaky(note=ConfigRecord({"blob": b"\x07" + ids[1:11].astype("<u2").tobytes()})),
        "token ids in a MetricRecord list": leaky(stats=MetricRecord({"seen": [int(i) for i in ids[:10]]})),
        "token ids as float32 tensor values": leaky(extra=ArrayRecord(array_dict={"t": Array(ids[:9].astype("<f4"))},
                                                                      keep_input=True)),
    }
    # the update's own tensors, which travel packed in one blob (inline in the header record for this
    # small adapter, else one uint8 Array): read as their values
    header, update = codec.decode(base.content)
    planted = {name: np.array(values) for name, values in update.items()}
    target = max(planted, key=lambda name: planted[name].size)
    planted[target].reshape(-1)[:9] = ids[:9]
    repacked = codec.encode(planted, kind=header.kind, job_id=header.job_id, server_round=header.round,
                            fingerprint=header.base_model_fingerprint, lora=codec.lora_spec_from_proto(header.adapter),
                            num_examples=header.num_examples, global_digest=header.global_digest)
    cases["token ids among the update's own tensor values"] = leaky(**{name: repacked[name] for name in repacked})
    blob_record = TENSORS_RECORD if TENSORS_RECORD in repacked else HEADER_RECORD
    for what, raw in cases.items():
        assert leaks(raw, secrets), f"the checker missed: {what}"
    assert any("record text" in f for f in leaks(cases["text in a ConfigRecord"], secrets))
    assert any("token ids in stats.seen" in f for f in record_leaks(
        message_from_proto(ProtoMessage.FromString(cases["token ids in a MetricRecord list"])), secrets))
    assert any(f"token ids in {blob_record}.{target}" in f for f in record_leaks(message_from_proto(
        ProtoMessage.FromString(cases["token ids among the update's own tensor values"])), secrets))


@pytest.mark.parametrize("placement", ["inline", "array"])
def test_the_update_tensors_are_audited_as_values_wherever_they_travel(placement: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control without a run: token ids planted in a tensor are reported from the record
    that carries the blob, inline (the header record) or in the Array, read as tensor values."""
    ids = [3012, 771, 15, 9088, 402, 402, 61, 2750, 19]
    secrets = Secrets()
    secrets.add_ids(ids)
    if placement == "array":
        monkeypatch.setattr(codec, "INLINE_LIMIT", 0)
    planted = {"a.lora_A": np.zeros((4, 16), np.float32), "b.lora_B": np.zeros((16, 4), np.float32)}
    planted["b.lora_B"].reshape(-1)[5:14] = ids
    content = codec.encode(planted, kind=codec.Kind.Value("UPDATE"), job_id="j", server_round=1, fingerprint="f",
                           lora=LoraSpec(), num_examples=1)
    where = HEADER_RECORD if placement == "inline" else TENSORS_RECORD
    assert (TENSORS_RECORD in content) == (placement == "array")
    assert content_record_leaks(content, secrets) == [f"token ids in {where}.b.lora_B at 5"]
    clean = codec.encode({k: np.zeros_like(v) for k, v in planted.items()}, kind=codec.Kind.Value("UPDATE"),
                         job_id="j", server_round=1, fingerprint="f", lora=LoraSpec(), num_examples=1)
    assert content_record_leaks(clean, secrets) == []


def test_inline_bytes_the_codec_refuses_are_still_audited_as_numbers() -> None:
    small = [12, 200, 7, 99, 54, 3, 250, 18]   # ids that fit a byte, sent as bytes the codec refuses
    secrets = Secrets()
    secrets.add_ids(small)
    content = codec.encode(None, kind=codec.Kind.Value("GLOBAL"), job_id="j", server_round=1, fingerprint="f",
                           lora=LoraSpec())
    fields = dict(content.config_records[HEADER_RECORD].items())
    content[HEADER_RECORD] = ConfigRecord({**fields, codec.INLINE_KEY: bytes([1, 2] + small)})
    with pytest.raises(UpdateRejected):
        codec.decode(content)
    assert content_record_leaks(content, secrets) == [f"token ids in {HEADER_RECORD}.{codec.INLINE_KEY} at 2"]


def _instruction_for(reply: Message) -> Message:
    """A stand-in instruction, so a leaky reply can be built with reply_to."""
    return Message(RecordDict(), dst_node_id=reply.metadata.src_node_id, message_type="train")
