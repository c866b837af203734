"""Tests' access to a message's tensors on the wire, as a sender could set them.

All tensors of a message travel in one packed blob (protos/codec.py), inline in
the header record or, above ``codec.INLINE_LIMIT``, as the one Array of the
tensors record; tests that tamper with one tensor's bytes read the per-tensor
wire values here and pack them again the way ``codec.encode`` lays them out,
with the header's segments rewritten to match, so only the change under test
differs. ``set_inline`` / ``set_array`` put a blob where a hostile sender likes.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from protos import codec


def header_of(content: RecordDict) -> codec.UpdateHeader:
    header = codec.UpdateHeader()
    header.ParseFromString(content.config_records[codec.HEADER_RECORD]["bytes"])
    return header


def wires(content: RecordDict) -> dict[str, np.ndarray]:
    """Each tensor's wire values (read-only views), the layout checked as decode checks it."""
    return codec.wire_views(content)


def packed_bytes(content: RecordDict) -> int:
    """The packed blob's length as sent: the inline bytes, or the Array's data (its .npy header
    included); 0 without either."""
    inline = content.config_records[codec.HEADER_RECORD].get(codec.INLINE_KEY)
    arrays = content.array_records.get(codec.TENSORS_RECORD)
    return (len(inline) if isinstance(inline, bytes) else 0) + (
        sum(len(array.data) for array in arrays.values()) if arrays is not None else 0)


def set_header(content: RecordDict, header: codec.UpdateHeader) -> RecordDict:
    """The header record's serialized header replaced, an inline blob (or any other key) kept."""
    fields = dict(content.config_records[codec.HEADER_RECORD].items())
    fields[codec.HEADER_KEY] = header.SerializeToString()
    content[codec.HEADER_RECORD] = ConfigRecord(fields)
    return content


def set_inline(content: RecordDict, value: object | None) -> RecordDict:
    """The header record's inline value set to ``value`` as it is (removed when None)."""
    fields = dict(content.config_records[codec.HEADER_RECORD].items())
    fields.pop(codec.INLINE_KEY, None)
    if value is not None:
        fields[codec.INLINE_KEY] = value
    content[codec.HEADER_RECORD] = ConfigRecord(fields)
    return content


def set_array(content: RecordDict, blob: np.ndarray | None) -> RecordDict:
    """The TENSORS record holding ``blob`` as its one Array (no record when ``blob`` is None)."""
    if blob is None:
        if codec.TENSORS_RECORD in content:
            del content[codec.TENSORS_RECORD]
        return content
    content[codec.TENSORS_RECORD] = ArrayRecord(
        array_dict={codec.PACKED_ARRAY: Array(np.ascontiguousarray(blob))}, keep_input=True)
    return content


def set_blob(content: RecordDict, blob: np.ndarray | None) -> RecordDict:
    """``blob`` in the canonical placement for its size (``codec.INLINE_LIMIT``), the other one
    cleared; no blob at all when None. A blob that is not 1-D uint8 can only be an Array."""
    blob = None if blob is None else np.ascontiguousarray(blob)
    small = blob is not None and blob.dtype == np.uint8 and blob.ndim == 1 and blob.size <= codec.INLINE_LIMIT
    set_inline(content, blob.tobytes() if small else None)
    return set_array(content, None if small else blob)


def blob_of(content: RecordDict) -> np.ndarray:
    """A writable copy of the packed blob's bytes, wherever it travels."""
    inline = content.config_records[codec.HEADER_RECORD].get(codec.INLINE_KEY)
    if inline is not None:
        return np.frombuffer(inline, np.uint8).copy()
    return np.array(codec.wire_view(content.array_records[codec.TENSORS_RECORD][codec.PACKED_ARRAY]))


def repacked(content: RecordDict, changes: Mapping[str, np.ndarray]) -> RecordDict:
    """``content`` with the named tensors' wire values replaced by ``changes`` (any dtype, any
    length: their raw bytes are sent), laid out as the codec lays out segments."""
    header = header_of(content)
    current = {name: np.array(values) for name, values in wires(content).items()}
    current.update(changes)
    raw, at = {}, 0
    for spec in sorted(header.tensors, key=lambda spec: spec.name):
        raw[spec.name] = np.ascontiguousarray(current[spec.name]).reshape(-1).view(np.uint8)
        spec.offset = -(-at // codec.SEGMENT_ALIGN) * codec.SEGMENT_ALIGN
        spec.nbytes = raw[spec.name].size
        at = spec.offset + spec.nbytes
    blob = np.zeros(at, np.uint8)
    for spec in header.tensors:
        blob[spec.offset : spec.offset + spec.nbytes] = raw[spec.name]
    set_header(content, header)
    return set_blob(content, blob if header.tensors else None)
