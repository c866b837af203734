"""Tests' access to a message's tensors on the wire, as a sender could set them.

All tensors of a message travel in one packed Array (protos/codec.py); tests
that tamper with one tensor's bytes read the per-tensor wire values here and
pack them again the way ``codec.encode`` lays them out, with the header's
segments rewritten to match, so only the change under test differs.
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
    """The packed Array's data length (its .npy header included); 0 without one."""
    return sum(len(array.data) for array in content.array_records[codec.TENSORS_RECORD].values())


def set_header(content: RecordDict, header: codec.UpdateHeader) -> RecordDict:
    content[codec.HEADER_RECORD] = ConfigRecord({"bytes": header.SerializeToString()})
    return content


def set_blob(content: RecordDict, blob: np.ndarray | None) -> RecordDict:
    """The TENSORS record holding ``blob`` as its one Array (none when ``blob`` is None)."""
    arrays = {} if blob is None else {codec.PACKED_ARRAY: Array(np.ascontiguousarray(blob))}
    content[codec.TENSORS_RECORD] = ArrayRecord(array_dict=arrays, keep_input=True)
    return content


def blob_of(content: RecordDict) -> np.ndarray:
    """A writable copy of the packed Array's bytes."""
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
