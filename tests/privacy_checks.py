"""The privacy audit's checker, shared by the in-process audit (tests/test_privacy_audit.py) and
the audit of a real deployment's captured traffic (tests/test_privacy_audit_deployment.py).

What must never leave an organization (``Secrets``, built from its silo files by
``silo_secrets``):

* **record text** — every 20-byte window (UTF-8; latin-1 text is the same bytes) of every raw
  field of the silo files and of every example as the trainer sees it (prompt, answer);
* **token-id sequences** — every window of 8 consecutive token ids of every example, tokenized
  as the trainer does it (prompt + answer with the chat template, truncated to max-length) and
  as plain text.

Where it is looked for:

* ``byte_leaks``: in any bytes (a serialized message, a request body, a whole TCP stream) —
  record text, and token-id windows written as little-endian uint16, int32, int64 and float32 at
  any byte offset;
* ``record_leaks``: in a decoded Flower Message, any 8 consecutive numbers of a config/metric
  list or of an Array equal to a token-id window (protobuf varints would hide the ids from a
  byte search);
* ``non_scalar_metrics``: in a decoded MetricRecord, any metric that is not a single number
  (a list in a MetricRecord is a value per something: per example, per token).

``content_leaks`` / ``message_leaks`` apply both record checks to a RecordDict / Message; ``leaks``
all three to one serialized Message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common.serde import message_from_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # type: ignore[attr-defined]

from clients.formatting import encode_example
from clients.silo import load_silo
from protos import codec
from protos.records import HEADER_RECORD, TENSORS_RECORD

TEXT_WINDOW = 20       # bytes of record text that count as a leak
ID_WINDOW = 8          # consecutive token ids that count as a leak
ID_DTYPES = ("<u2", "<i4", "<i8", "<f4")


@dataclass
class Secrets:
    """Byte windows of record text and token-id windows, from the silos."""

    text: set[bytes] = field(default_factory=set)
    ids: dict[str, set[bytes]] = field(default_factory=lambda: {d: set() for d in ID_DTYPES})
    id_tuples: set[tuple[int, ...]] = field(default_factory=set)
    sources: int = 0

    def add_text(self, text: str) -> None:
        data = text.encode("utf-8")
        for start in range(len(data) - TEXT_WINDOW + 1):
            window = data[start : start + TEXT_WINDOW]
            if len(set(window)) >= 6:        # not a run of spaces or dashes: a piece of the record
                self.text.add(window)
        self.sources += 1

    def add_ids(self, ids: list[int]) -> None:
        for start in range(len(ids) - ID_WINDOW + 1):
            window = tuple(int(i) for i in ids[start : start + ID_WINDOW])
            if len(set(window)) < 3:
                continue
            self.id_tuples.add(window)
            for dtype in ID_DTYPES:
                self.ids[dtype].add(np.asarray(window, dtype=dtype).tobytes())


def silo_secrets(paths: Iterable[Path], tokenizer: Any, max_length: int) -> Secrets:
    """Every raw field of every record of the (.jsonl) silo files, and every example as the
    trainer sees it, as text windows and token-id windows."""
    secrets = Secrets()
    for path in paths:
        for line in Path(path).read_text().splitlines():
            for value in json.loads(line).values():
                secrets.add_text(value)
                secrets.add_ids(tokenizer(value, add_special_tokens=False).input_ids)
        for example in load_silo(path).examples:     # as the trainer sees them
            secrets.add_text(example.prompt)
            secrets.add_text(example.answer)
            secrets.add_ids(encode_example(tokenizer, example.prompt, example.answer, max_length).input_ids)
    return secrets


# ---- the checker ------------------------------------------------------------------------

def byte_leaks(raw: bytes, secrets: Secrets) -> list[str]:
    """Record text or token-id windows found anywhere in `raw`."""
    found: list[str] = []
    for start in range(len(raw) - TEXT_WINDOW + 1):
        if raw[start : start + TEXT_WINDOW] in secrets.text:
            found.append(f"record text at byte {start}: {raw[start:start + TEXT_WINDOW]!r}")
            break
    for dtype, windows in secrets.ids.items():
        width = ID_WINDOW * np.dtype(dtype).itemsize
        for start in range(len(raw) - width + 1):
            if raw[start : start + width] in windows:
                found.append(f"token ids as {dtype} at byte {start}")
                break
    return found


def _numbers(value: Any) -> Iterable[list[float]]:
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        yield [float(v) for v in value]


def id_window_leaks(where: str, seq: list[float], secrets: Secrets) -> list[str]:
    """A token-id window among 8 consecutive numbers of `seq`."""
    for start in range(len(seq) - ID_WINDOW + 1):
        window = seq[start : start + ID_WINDOW]
        if all(float(v).is_integer() for v in window) and tuple(int(v) for v in window) in secrets.id_tuples:
            return [f"token ids in {where} at {start}"]
    return []


def record_sequences(name: str, record: Mapping[str, Any]) -> list[tuple[str, list[float]]]:
    """The numeric lists of a ConfigRecord or MetricRecord, named `record.key`."""
    return [(f"{name}.{key}", seq) for key, value in record.items() for seq in _numbers(value)]


def array_sequence(array: Any) -> list[float] | None:
    """An Array's values as numbers, or None when they are not numeric (or do not decode)."""
    try:
        values = array.numpy().ravel()
    except Exception:
        return None
    return values.astype(np.float64).tolist() if values.dtype.kind in "iuf" else None


def packed_tensor_sequences(content: RecordDict) -> list[tuple[str, list[float]]] | None:
    """Each tensor of the codec's one packed blob (inline in the header record or the tensors
    record's Array) as its wire values (protos/codec.py ``wire_views``: float32 values for fp32,
    codes for the quantized encodings), or None when the content is not a codec message."""
    try:
        views = codec.wire_views(content)
    except Exception:
        return None
    return [(key, values.astype(np.float64).ravel().tolist()) for key, values in views.items()
            if values.dtype.kind in "iuf"]


def content_record_leaks(content: RecordDict, secrets: Secrets) -> list[str]:
    """Token-id windows among the numbers of decoded records (config/metric lists, arrays)."""
    sequences: list[tuple[str, list[float]]] = []
    tensors = packed_tensor_sequences(content)
    for name, record in content.config_records.items():
        sequences += record_sequences(name, record)
        inline = record.get(codec.INLINE_KEY) if name == HEADER_RECORD else None
        if isinstance(inline, bytes):
            # the adapter's tensors inline: each as its values; bytes the codec refuses, as numbers
            sequences += ([(f"{name}.{key}", values) for key, values in tensors] if tensors is not None else
                          [(f"{name}.{codec.INLINE_KEY}", np.frombuffer(inline, np.uint8).astype(np.float64).tolist())])
    for name, record in content.metric_records.items():
        sequences += record_sequences(name, record)
    for name, record in content.array_records.items():
        if name == TENSORS_RECORD and tensors is not None:   # the adapter's tensors, each as its values
            sequences += [(f"{name}.{key}", values) for key, values in tensors]
            continue
        for key, array in record.items():
            values = array_sequence(array)
            if values is not None:
                sequences.append((f"{name}.{key}", values))
    found = []
    for where, seq in sequences:
        found += id_window_leaks(where, seq, secrets)
    return found


def record_leaks(message: Message, secrets: Secrets) -> list[str]:
    """Token-id windows among the numbers of a message's decoded records."""
    return content_record_leaks(message.content, secrets) if message.has_content() else []


def non_scalar_metrics(name: str, record: Mapping[str, Any]) -> list[str]:
    """The metrics of a MetricRecord that are not one number (a list: a value per example)."""
    return [f"metric {name}.{key} is not a scalar: {type(value).__name__} of {len(value)}"
            if isinstance(value, list) else f"metric {name}.{key} is not a number: {type(value).__name__}"
            for key, value in record.items()
            if isinstance(value, list) or not isinstance(value, (int, float)) or isinstance(value, bool)]


def content_leaks(content: RecordDict, secrets: Secrets) -> list[str]:
    """Token-id windows in the records, and every metric not a single number."""
    found = content_record_leaks(content, secrets)
    for name, record in content.metric_records.items():
        found += non_scalar_metrics(name, record)
    return found


def message_leaks(message: Message, secrets: Secrets) -> list[str]:
    return content_leaks(message.content, secrets) if message.has_content() else []


def leaks(raw: bytes, secrets: Secrets) -> list[str]:
    """Everything the checker finds in one serialized Flower Message."""
    return byte_leaks(raw, secrets) + message_leaks(message_from_proto(ProtoMessage.FromString(raw)), secrets)
