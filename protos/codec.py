"""Adapter tensors ⇄ Flower records, and the checks applied to what arrives.

Every tensor's encoded bytes travel in ONE packed blob, in one of two places of
a Flower ``RecordDict``, chosen by the blob's size:

* **inline** (``len(blob) <= INLINE_LIMIT``): ``HEADER_RECORD`` (ConfigRecord)
  ``{"bytes": UpdateHeader serialized, INLINE_KEY: the blob}``, and no
  ``TENSORS_RECORD``;
* **array** (``len(blob) > INLINE_LIMIT``): ``HEADER_RECORD`` ``{"bytes": ...}``
  and ``TENSORS_RECORD`` (ArrayRecord) holding ONE uint8 Array, ``PACKED_ARRAY``;
* no tensor announced (global-delta's "the same global"): the header record
  alone.

Flower moves every record and Array of a message as objects of their own, one
request each at the SuperLink (benchmarks/RESULTS.md, "Deployment overhead,
message path"): one Array per tensor cost a deployed round seconds, and even the
one packed Array is three objects (ArrayRecord, Array, its chunk) where a
ConfigRecord, which has no children, is one. Inline is capped at INLINE_LIMIT so
that an inline record is never a bigger object than one of Flower's Array chunks
already is; above it the Array keeps Flower's chunking. Each form is the only one
accepted for its size: anything else is refused (``_segments``).

Each TensorSpec says where its segment is (``offset``, ``nbytes``) and how to
decode it; the segments follow in name order, each at the next multiple of
``SEGMENT_ALIGN`` bytes (so float32/float16 views are aligned), zero bytes
between them, none after the last. The encodings themselves (fp32, fp16, int8,
...) live one per module in protos/encodings/; this module only dispatches on the
TensorSpec's wire id, so a new encoding does not edit it. ``decode`` trusts
nothing: it parses the header, checks the placement and the whole layout against
what each spec's encoding needs for its shape before viewing any segment, and
decodes to float32 (fp32: read-only views into the one buffer, no copy).
``check_header`` and ``check_values`` then compare against what the receiver
expects.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, NamedTuple

import numpy as np
from numpy.lib import format as npy_format
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from google.protobuf.message import DecodeError

from protos import encodings
from protos.adapter import Adapter, LoraSpec
from protos.encodings import UpdateEncoding, encoding_names  # noqa: F401  (encoding_names: part of this API)
from protos.errors import RejectReason, UpdateRejected
from protos.records import HEADER_RECORD, TENSORS_RECORD
from protos.silotune.v1 import update_pb2 as pb

#: 3: small messages' tensors inline in the header record (2: always in one Array; 1: one Array
#: per tensor; both refused)
PROTOCOL_VERSION = 3
#: the one Array of TENSORS_RECORD
PACKED_ARRAY = "packed"
#: the header record's key of the serialized UpdateHeader
HEADER_KEY = "bytes"
#: the header record's key of an inline blob (the same name as the Array's: it is the same blob)
INLINE_KEY = "packed"
#: the largest blob that travels inline, in bytes. Flower 1.41 cuts an Array into objects of at
#: most 5 MiB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE), so an inline header record is never a bigger
#: object than one chunk already is; larger blobs keep Flower's chunking (one huge HTTP body
#: would have to be held, hashed and sent whole)
INLINE_LIMIT = 4 * 1024 * 1024
#: numpy views of the blob start at a multiple of this many bytes (CPython's bytes data is
#: 16-byte aligned; ``_aligned_blob`` copies rather than view a float misaligned)
_BUFFER_ALIGN = 16
#: every segment starts at a multiple of this many bytes of the packed blob
SEGMENT_ALIGN = 64
#: a tensor of more values than this is refused before its size is computed (int64 products)
_MAX_VALUES = 2**62

Encoding = pb.Encoding
Kind = pb.Kind
UpdateHeader = pb.UpdateHeader


def encoding_from_name(name: str) -> int:
    """The wire id of the encoding called ``name`` (any case); ValueError listing the valid names."""
    return encodings.get(name).wire_id


def adapter_config_proto(spec: LoraSpec) -> pb.AdapterConfig:
    return pb.AdapterConfig(
        rank=spec.rank,
        alpha=spec.alpha,
        target_modules=sorted(spec.target_modules),
        dropout=spec.dropout,
    )


def lora_spec_from_proto(cfg: pb.AdapterConfig) -> LoraSpec:
    return LoraSpec(
        rank=cfg.rank,
        alpha=cfg.alpha,
        target_modules=tuple(cfg.target_modules),
        dropout=cfg.dropout,
    )


def _encode_tensor(name: str, values: np.ndarray, encoding: type[UpdateEncoding]) -> tuple[pb.TensorSpec, np.ndarray]:
    values = np.asarray(values, dtype=np.float32)
    wire, scale = encoding.encode(values)
    # scale 0.0 (unused) is proto3's default and is not serialized
    spec = pb.TensorSpec(name=name, shape=list(values.shape), dtype="float32", encoding=encoding.wire_id,
                         scale=float(scale))
    return spec, wire


class EncodedTensors(NamedTuple):
    """An adapter's tensors in one encoding: their specs (sorted by name, each with its segment)
    and the packed blob in the placement its size calls for: ``arrays`` the TENSORS_RECORD's
    (``{PACKED_ARRAY: Array}`` above INLINE_LIMIT, else none), ``inline`` the header record's
    blob (None when it travels in ``arrays`` or no tensor is announced). Encoded once, they can
    go out under several headers (the global delta's bytes, kept for a round)."""

    specs: tuple[pb.TensorSpec, ...]
    arrays: Mapping[str, Array]
    inline: bytes | None = None


def _aligned(at: int) -> int:
    return -(-at // SEGMENT_ALIGN) * SEGMENT_ALIGN


def encode_tensors(adapter: Adapter, encoding: int = pb.FP32) -> EncodedTensors:
    """``adapter``'s tensors in the encoding with wire id ``encoding``; ValueError if none has it."""
    chosen = encodings.by_wire_id().get(encoding)
    if chosen is None:
        raise ValueError(f"unsupported encoding {encoding}; registered: {encoding_names()}")
    return pack_tensors(_encode_tensor(name, adapter[name], chosen) for name in sorted(adapter))


def pack_tensors(parts: Iterable[tuple[pb.TensorSpec, np.ndarray]]) -> EncodedTensors:
    """Encoded tensors (spec, wire values) laid out in one packed blob, inline or in one Array by
    its size (module docstring): sorted by name, each spec given its segment. ValueError if a name repeats or a wire is not what its encoding's decode checks
    for (an encoding module's bug, caught where it is sent rather than where it is refused)."""
    table = _decoders()
    laid: list[tuple[pb.TensorSpec, np.ndarray]] = []
    at = 0
    for spec, wire in sorted(parts, key=lambda part: part[0].name):
        decoder = table.get(spec.encoding)
        if decoder is None:
            raise ValueError(f"{spec.name}: unsupported encoding {spec.encoding}; registered: {encoding_names()}")
        wire = np.asarray(wire)
        if wire.dtype != decoder.wire_dtype or wire.shape != _wire_shape(decoder, tuple(spec.shape)):
            raise ValueError(f"{spec.name}: {decoder.encoding.name} gave {wire.dtype} {wire.shape}, "
                             f"its wire is {decoder.wire_dtype} {_wire_shape(decoder, tuple(spec.shape))}")
        if laid and laid[-1][0].name == spec.name:
            raise ValueError(f"tensor {spec.name!r} given twice")
        spec.offset, spec.nbytes = _aligned(at), wire.nbytes
        at = spec.offset + spec.nbytes
        laid.append((spec, wire))
    if not laid:
        return EncodedTensors((), {})
    blob = np.zeros(at, dtype=np.uint8)  # zeros: the padding the receiver checks
    for spec, wire in laid:
        blob[spec.offset : spec.offset + spec.nbytes] = np.ascontiguousarray(wire).reshape(-1).view(np.uint8)
    specs = tuple(spec for spec, _ in laid)
    if at > INLINE_LIMIT:
        return EncodedTensors(specs, {PACKED_ARRAY: Array(blob)})
    # inline, even when every tensor is empty (0 bytes): tensors announced always come with a blob
    return EncodedTensors(specs, {}, blob.tobytes())


def encode(
    adapter: Adapter | None,
    *,
    kind: int,
    job_id: str,
    server_round: int,
    fingerprint: str,
    lora: LoraSpec,
    num_examples: int = 0,
    metrics: Mapping[str, float] | None = None,
    encoding: int = pb.FP32,
    tensors: EncodedTensors | None = None,
    global_digest: str = "",
    base_digest: str = "",
) -> RecordDict:
    """Pack an adapter and its header into a RecordDict ready for a Message.

    ``encoding`` is a wire id (``encoding_from_name("int8")``); ValueError if no
    registered encoding has it. ``tensors``: already encoded (``encode_tensors``),
    instead of ``adapter``. ``global_digest``, ``base_digest``: the header fields of
    the job setting global-delta (protos/global_delta.py).
    """
    if tensors is None:
        tensors = encode_tensors(adapter or {}, encoding)
    header = pb.UpdateHeader(
        protocol_version=PROTOCOL_VERSION,
        kind=kind,
        job_id=job_id,
        round=server_round,
        base_model_fingerprint=fingerprint,
        adapter=adapter_config_proto(lora),
        num_examples=num_examples,
        global_digest=global_digest,
        base_digest=base_digest,
    )
    for key, value in (metrics or {}).items():
        header.metrics[key] = float(value)
    header.tensors.extend(tensors.specs)
    if tensors.inline is not None and tensors.arrays:
        raise ValueError("encoded tensors carry a blob both inline and in Arrays; pack_tensors gives one placement")
    fields: dict[str, bytes] = {HEADER_KEY: header.SerializeToString()}
    if tensors.inline is not None:
        fields[INLINE_KEY] = tensors.inline
    records: dict[str, ConfigRecord | ArrayRecord] = {HEADER_RECORD: ConfigRecord(fields)}
    if tensors.arrays:
        records[TENSORS_RECORD] = ArrayRecord(array_dict=dict(tensors.arrays), keep_input=True)
    return RecordDict(records)


def _reject(reason: RejectReason, detail: str) -> UpdateRejected:
    return UpdateRejected(reason, detail)


def parse_header(raw: object) -> pb.UpdateHeader:
    """The header's bytes, parsed, in a protocol version this side speaks; UpdateRejected otherwise."""
    if not isinstance(raw, bytes):
        raise _reject(RejectReason.MALFORMED, "header bytes absent")
    header = pb.UpdateHeader()
    try:
        header.ParseFromString(raw)
    except DecodeError as err:
        raise _reject(RejectReason.MALFORMED, f"header does not parse: {err}") from None
    if header.protocol_version != PROTOCOL_VERSION:
        raise _reject(
            RejectReason.PROTOCOL_VERSION,
            f"protocol {header.protocol_version}, this side speaks {PROTOCOL_VERSION} (version 3 sends small "
            "messages' tensors inline in the header record): run the same silotune release on the "
            "coordinator and every agent",
        )
    return header


def decode(content: RecordDict) -> tuple[pb.UpdateHeader, Adapter]:
    """Parse header and tensors; raise UpdateRejected on any inconsistency."""
    header, segments = _segments(content)
    adapter: Adapter = {}
    for spec, decoder, wire in segments:
        adapter[spec.name] = decoder.decode(wire, spec)
    return header, adapter


def wire_views(content: RecordDict) -> dict[str, np.ndarray]:
    """Each tensor's wire values (its encoding's dtype and wire shape), read-only views into the
    packed blob (inline or in the Array), after the checks ``decode`` makes of the layout;
    UpdateRejected otherwise."""
    return {spec.name: wire for spec, _, wire in _segments(content)[1]}


class _Decoder(NamedTuple):
    """What decoding a tensor needs of an encoding, taken out of its class once."""

    encoding: type[UpdateEncoding]
    wire_dtype: np.dtype
    decode: Callable[[np.ndarray, pb.TensorSpec], np.ndarray]
    wire_shape: Callable[[tuple[int, ...]], tuple[int, ...]] | None  # None: the logical shape


def _wire_shape(decoder: _Decoder, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape if decoder.wire_shape is None else tuple(int(d) for d in decoder.wire_shape(shape))


_decoder_table: tuple[Mapping[int, type[UpdateEncoding]], dict[int, _Decoder]] = ({}, {})


def _decoders() -> dict[int, _Decoder]:
    """encodings.by_wire_id() as _Decoder tuples, rebuilt when that table changes.

    Per tensor this saves the attribute lookups and method binding of going
    through the class, which show on fp32, whose decode is only a view and checks.
    """
    global _decoder_table
    table = encodings.by_wire_id()
    built_from, decoders = _decoder_table
    if table is not built_from:
        decoders = {}
        for wire_id, encoding in table.items():
            packs = getattr(encoding.wire_shape, "__func__", None) is not UpdateEncoding.wire_shape.__func__
            decoders[wire_id] = _Decoder(encoding, encoding.wire_dtype, encoding.decode,
                                         encoding.wire_shape if packs else None)
        _decoder_table = (table, decoders)
    return decoders


def _segments(content: RecordDict) -> tuple[pb.UpdateHeader, list[tuple[pb.TensorSpec, _Decoder, np.ndarray]]]:
    """The header, and per tensor in name order its spec, decoder and wire view.

    Everything the network chose is checked before a segment is viewed: the
    records, the header, the blob's placement (``_blob``) and the layout
    (``_layout``)."""
    header_record = content.config_records.get(HEADER_RECORD)
    if header_record is None:
        raise _reject(RejectReason.MALFORMED, f"record {HEADER_RECORD!r} absent")
    fields = dict(header_record.items())  # plain dict: a record's __getitem__ is slow
    header = parse_header(fields.get(HEADER_KEY))  # first: another version may lay its records out otherwise
    extra = sorted(set(fields) - {HEADER_KEY, INLINE_KEY})
    if extra:
        raise _reject(RejectReason.MALFORMED,
                      f"unexpected key(s) {[repr(key)[:40] for key in extra[:3]]} in the header record")
    specs = sorted(header.tensors, key=lambda spec: spec.name)
    for before, after in zip(specs, specs[1:]):
        if before.name == after.name:
            raise _reject(RejectReason.TENSOR_NAMES, f"{before.name}: announced twice")
    blob = _blob(fields.get(INLINE_KEY), content.array_records.get(TENSORS_RECORD), announced=bool(specs))
    if blob is None:
        return header, []
    laid = _layout(specs, blob)
    return header, [(spec, decoder, blob[spec.offset : spec.offset + spec.nbytes].view(decoder.wire_dtype)
                     .reshape(shape)) for spec, decoder, shape in laid]


def _blob(inline: object, arrays: ArrayRecord | None, *, announced: bool) -> np.ndarray | None:
    """The packed blob as a read-only uint8 view, from the one placement its size calls for
    (module docstring); None when no tensor is announced and none is sent. UpdateRejected
    MALFORMED (or TENSOR_DTYPE / TENSOR_SHAPE for a mislabelled Array) otherwise."""
    if inline is not None and arrays is not None:
        raise _reject(RejectReason.MALFORMED, f"tensors both inline ({HEADER_RECORD!r}) and in {TENSORS_RECORD!r}; "
                      "one placement only")
    if not announced:
        if inline is not None or arrays is not None:
            where = f"inline bytes ({INLINE_KEY!r})" if inline is not None else f"the record {TENSORS_RECORD!r}"
            raise _reject(RejectReason.MALFORMED, f"no tensor announced, yet {where} sent")
        return None
    if inline is not None:
        if not isinstance(inline, bytes):
            raise _reject(RejectReason.MALFORMED,
                          f"inline tensors ({INLINE_KEY!r}) are {type(inline).__name__}, expected bytes")
        if len(inline) > INLINE_LIMIT:
            raise _reject(RejectReason.MALFORMED, f"inline blob of {len(inline)} bytes: a blob above INLINE_LIMIT "
                          f"({INLINE_LIMIT}) travels in the ArrayRecord {TENSORS_RECORD!r}")
        return _aligned_blob(np.frombuffer(inline, dtype=np.uint8))
    if arrays is None:
        raise _reject(RejectReason.MALFORMED, f"tensors announced but no blob: neither inline ({INLINE_KEY!r} "
                      f"in {HEADER_RECORD!r}) nor in {TENSORS_RECORD!r}")
    present = dict(arrays.items())  # plain dict: ArrayRecord's __getitem__ is slow
    if list(present) != [PACKED_ARRAY]:
        raise _reject(RejectReason.MALFORMED,
                      f"tensors travel in the one Array {PACKED_ARRAY!r}; got {sorted(present)[:3]}")
    array = present[PACKED_ARRAY]
    if array.dtype != "uint8":
        raise _reject(RejectReason.TENSOR_DTYPE, f"packed Array is {array.dtype}, expected uint8")
    if len(array.shape) != 1:
        raise _reject(RejectReason.TENSOR_SHAPE, f"packed Array has shape {tuple(array.shape)}, expected 1-D")
    if array.shape[0] <= INLINE_LIMIT:  # before the bytes are looked at: the label is enough
        raise _reject(RejectReason.MALFORMED, f"packed Array of {array.shape[0]} bytes: a blob of up to "
                      f"INLINE_LIMIT ({INLINE_LIMIT}) travels inline in {HEADER_RECORD!r}")
    try:
        blob = wire_view(array)
    except Exception as err:  # a corrupt Array buffer must not crash the round
        raise _reject(RejectReason.MALFORMED, f"packed Array does not deserialize: {err}") from None
    if blob.dtype != np.uint8:
        raise _reject(RejectReason.TENSOR_DTYPE, f"packed Array's data is {blob.dtype}, announced uint8")
    if blob.shape != tuple(array.shape):
        raise _reject(RejectReason.TENSOR_SHAPE,
                      f"packed Array's data has shape {blob.shape}, announced {tuple(array.shape)}")
    return _aligned_blob(blob)


def _aligned_blob(blob: np.ndarray) -> np.ndarray:
    """``blob`` itself when it starts at a multiple of _BUFFER_ALIGN (then every segment, at a
    multiple of SEGMENT_ALIGN, is aligned for any wire dtype), else a read-only aligned copy.

    CPython's bytes objects keep their data 16-byte aligned, and .npy headers pad the data to a
    multiple of 64: the copy is for a runtime where that does not hold, not a path taken here."""
    if blob.ctypes.data % _BUFFER_ALIGN == 0:
        return blob
    room = np.empty(blob.size + _BUFFER_ALIGN, dtype=np.uint8)
    start = -room.ctypes.data % _BUFFER_ALIGN
    copy = room[start : start + blob.size]
    copy[...] = blob
    copy.flags.writeable = False
    return copy


def _layout(specs: list[pb.TensorSpec], blob: np.ndarray) -> list[tuple[pb.TensorSpec, _Decoder, tuple[int, ...]]]:
    """Each spec (in name order) with its decoder and wire shape, once the whole layout holds:
    a known encoding and logical dtype, a shape whose wire size is exactly ``nbytes``, each
    segment at the next multiple of SEGMENT_ALIGN after the one before (no overlap, no gap),
    zero padding, and no byte after the last. UpdateRejected naming the tensor otherwise."""
    table = _decoders()
    size = blob.size
    laid = []
    at, previous = 0, "the start"
    for spec in specs:
        name = spec.name
        decoder = table.get(spec.encoding)
        if decoder is None:
            raise _reject(RejectReason.TENSOR_DTYPE, f"{name}: unknown encoding {spec.encoding}")
        if spec.dtype != "float32":
            raise _reject(RejectReason.TENSOR_DTYPE, f"{name}: logical dtype {spec.dtype!r}")
        shape = tuple(spec.shape)  # repeated int64: Python ints
        if min(shape, default=0) < 0 or math.prod(shape) > _MAX_VALUES:
            raise _reject(RejectReason.TENSOR_SHAPE, f"{name}: shape {shape}")
        wire_shape = _wire_shape(decoder, shape)
        needed = math.prod(wire_shape) * decoder.wire_dtype.itemsize
        if spec.nbytes != needed:
            raise _reject(RejectReason.TENSOR_SHAPE, f"{name}: {spec.nbytes} bytes, {decoder.encoding.name} "
                          f"of shape {shape} takes {needed}")
        start = _aligned(at)
        if spec.offset != start:
            if spec.offset < at:
                problem = f"overlaps {previous} (which ends at {at})"
            elif spec.offset % SEGMENT_ALIGN:
                problem = f"is not at a multiple of {SEGMENT_ALIGN}"
            else:
                problem = f"leaves a gap after {previous}"
            raise _reject(RejectReason.MALFORMED, f"{name}: segment at byte {spec.offset} {problem}; "
                          f"expected {start} (segments in name order, each at the next multiple of {SEGMENT_ALIGN})")
        if start + needed > size:
            raise _reject(RejectReason.MALFORMED, f"{name}: segment {start}..{start + needed} past the end of "
                          f"the packed blob ({size} bytes)")
        if blob[at:start].any():
            raise _reject(RejectReason.MALFORMED, f"{name}: non-zero padding before its segment")
        laid.append((spec, decoder, wire_shape))
        at, previous = start + needed, name
    if at != size:
        raise _reject(RejectReason.MALFORMED, f"{size - at} bytes after the last segment ({previous})")
    return laid


def wire_view(array: Array) -> np.ndarray:
    """The Array's values as a read-only view over its bytes, without a copy.

    Flower's ``Array.numpy()`` copies the payload through ``np.load``; the
    coordinator decodes every update once and needs no copy of it. The .npy
    header is parsed here and the data is viewed in place; anything that tries
    to write to it fails. Parsed headers are cached by their exact bytes
    (``_npy_header``): every reply of a job carries the same few headers, and
    numpy's parser (ast-based) is slow next to a dict lookup.
    """
    data = array.data
    shape, dtype, count, offset = _npy_header(data)
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{len(data) - offset} data bytes for {count} values of {dtype}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


_NPY_MAGIC = b"\x93NUMPY"
#: headers up to this many bytes are cached (numpy writes 128 for our tensors;
#: it accepts up to ~10 KB, which are parsed but not kept)
_HEADER_CACHE_MAX_BYTES = 512
#: at most this many distinct headers are kept (oldest dropped first): a job has
#: one per tensor shape and dtype, and keys of ≤ 512 bytes keep it under 1 MB whatever is sent
_HEADER_CACHE_MAX_ENTRIES = 1024
_header_cache: dict[bytes, tuple[tuple[int, ...], np.dtype, int, int]] = {}


def _npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype, int, int]:
    """(shape, dtype, value count, data offset) of a .npy buffer; ValueError if
    it is not a C-ordered, non-object .npy v1.0/v2.0 array.

    The result is a pure function of the header's bytes (magic, version, length
    field and the header text it announces), which are the cache key, so a
    cached answer is the one the parser would give. What depends on the rest of
    the buffer (its length) is checked by the caller every time.
    """
    end = 0
    if data[:6] == _NPY_MAGIC:
        version = data[6:8]
        if version == b"\x01\x00" and len(data) >= 10:
            end = 10 + int.from_bytes(data[8:10], "little")
        elif version == b"\x02\x00" and len(data) >= 12:
            end = 12 + int.from_bytes(data[8:12], "little")
    if not 0 < end <= min(len(data), _HEADER_CACHE_MAX_BYTES):
        return _parse_npy_header(data)  # not cacheable: parsed (or rejected) as before
    key = bytes(data[:end])
    cached = _header_cache.get(key)
    if cached is not None:
        return cached
    parsed = _parse_npy_header(key)
    if parsed[3] != end:  # cannot happen: the parser reads exactly the announced header
        raise ValueError(f"header ends at {parsed[3]}, its length field says {end}")
    if parsed[1].fields is None and parsed[1].subdtype is None:  # plain dtypes only: immutable
        if len(_header_cache) >= _HEADER_CACHE_MAX_ENTRIES:
            try:
                del _header_cache[next(iter(_header_cache))]
            except (KeyError, StopIteration, RuntimeError):  # another thread got there first
                pass
        _header_cache[key] = parsed
    return parsed


def _parse_npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype, int, int]:
    stream = io.BytesIO(data)
    version = npy_format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    if fortran_order or dtype.hasobject:
        raise ValueError("fortran-ordered or object arrays are not accepted")
    count = int(np.prod(shape, dtype=np.int64))
    return tuple(shape), dtype, count, stream.tell()


@dataclass(frozen=True)
class Expectation:
    """What the receiver expects of a header, for check_header."""

    kind: int
    job_id: str
    server_round: int | None
    fingerprint: str
    lora: LoraSpec
    layout: Mapping[str, tuple[int, ...]]


def check_header(header: pb.UpdateHeader, expected: Expectation) -> None:
    """Compare a decoded header with what was sent; raise UpdateRejected."""
    if header.kind != expected.kind:
        raise _reject(RejectReason.WRONG_KIND, f"kind {header.kind}, expected {expected.kind}")
    if header.job_id != expected.job_id:
        raise _reject(RejectReason.WRONG_JOB, f"job {header.job_id!r}, expected {expected.job_id!r}")
    if expected.server_round is not None and header.round != expected.server_round:
        raise _reject(RejectReason.WRONG_ROUND, f"round {header.round}, expected {expected.server_round}")
    if header.base_model_fingerprint != expected.fingerprint:
        raise _reject(
            RejectReason.BASE_MODEL_MISMATCH,
            f"base model {header.base_model_fingerprint!r}, expected {expected.fingerprint!r}",
        )
    try:
        got = lora_spec_from_proto(header.adapter)
    except ValueError as err:  # rank 0, no target module, dropout out of range
        raise _reject(RejectReason.ADAPTER_CONFIG_MISMATCH, f"adapter config invalid: {err}") from None
    if got != expected.lora:
        raise _reject(RejectReason.ADAPTER_CONFIG_MISMATCH, f"adapter {got}, expected {expected.lora}")
    names = {t.name: tuple(int(d) for d in t.shape) for t in header.tensors}
    if set(names) != set(expected.layout):
        extra = sorted(set(names) - set(expected.layout))[:3]
        missing = sorted(set(expected.layout) - set(names))[:3]
        raise _reject(RejectReason.TENSOR_NAMES, f"extra {extra}, missing {missing}")
    for name, shape in names.items():
        if shape != tuple(expected.layout[name]):
            raise _reject(RejectReason.TENSOR_SHAPE, f"{name}: {shape} vs {tuple(expected.layout[name])}")
    if header.kind == pb.UPDATE and header.num_examples == 0:
        raise _reject(RejectReason.NUM_EXAMPLES, "an update must report num_examples > 0")


#: check_values works through each tensor in slices of this many values: its
#: float32/float64 scratch (768 KiB) stays in a core's L2 cache. The slices are
#: part of the result: each slice's squares are summed on their own, then the
#: slice sums in order, so whoever splits the work must split it here.
CHECK_CHUNK = 1 << 16


class NormScratch:
    """One thread's scratch for ``slice_squares`` (float32 difference, float64 squares)."""

    def __init__(self) -> None:
        self.diff = np.empty(CHECK_CHUNK, dtype=np.float32)
        self.wide = np.empty(CHECK_CHUNK, dtype=np.float64)


def slice_squares(values: np.ndarray, base: np.ndarray | None, start: int, scratch: NormScratch) -> float:
    """Σ (values − base)² over the slice of ``CHECK_CHUNK`` flat values from ``start``.

    The difference is taken in the dtype ``values - base`` has (float32 for
    updates), cast to float64 (exact), squared (exact: a float32 squared fits a
    float64) and summed in the fixed lane order of ``protos/norm_kernels.py``.
    For the inputs the compiled pass does not take as they are (``tensor_squares``
    takes float32 ones whole): the values, or their difference, are first cast
    into the scratch by numpy, then summed the same way. Non-finite when a value
    is, or when a float32 difference overflows.
    """
    from protos.norm_kernels import sum_of_squares  # numba: imported by the processes that check

    part = values[start : start + CHECK_CHUNK]
    size = part.size
    other = None if base is None else base[start : start + size]
    out = scratch.wide[:size]
    if other is None:
        np.copyto(out, part, casting="unsafe")
    elif np.result_type(values, base) == np.float32:
        diff = scratch.diff[:size]
        np.subtract(part, other, out=diff)
        return float(sum_of_squares(diff))  # the same float32 differences as the compiled pass
    else:  # other dtypes: numpy's loop for the inputs, cast into the scratch
        np.subtract(part, other, out=out, casting="unsafe")
    return float(sum_of_squares(out))


def _compiled_input(part: np.ndarray) -> bool:
    """What the compiled pass takes as it is: contiguous native float32."""
    return part.dtype == np.float32 and part.flags.c_contiguous


def tensor_squares(values: np.ndarray, base: np.ndarray | None, scratch: NormScratch) -> list[float]:
    """``slice_squares`` of each slice of one flat tensor, in order: for float32 values and
    references in one compiled call (``norm_kernels.slice_sums``), the same bits."""
    from protos.norm_kernels import slice_sums

    count = -(-values.size // CHECK_CHUNK)
    if _compiled_input(values) and (base is None or _compiled_input(base)):
        out = np.empty(count, dtype=np.float64)
        slice_sums(values, base, CHECK_CHUNK, out)
        return out.tolist()
    return [slice_squares(values, base, start * CHECK_CHUNK, scratch) for start in range(count)]


def norm_slices(adapter: Adapter, reference: Adapter | None) -> list[tuple[str, np.ndarray, np.ndarray | None, int]]:
    """The slices the norm is summed over, in order: (name, flat values, flat reference, start)."""
    slices = []
    for name, values in adapter.items():
        flat = np.asarray(values).reshape(-1)
        base = None if reference is None else np.asarray(reference[name]).reshape(-1)
        slices += [(name, flat, base, start) for start in range(0, flat.size, CHECK_CHUNK)]
    return slices


def norm_tensors(slices: list[tuple[str, np.ndarray, np.ndarray | None, int]]) -> list[
        tuple[int, np.ndarray, np.ndarray | None]]:
    """The tensors of ``norm_slices``: (index of its first slice, flat values, flat reference)."""
    return [(i, flat, base) for i, (_, flat, base, start) in enumerate(slices) if start == 0]


def judge_values(
    slices: list[tuple[str, np.ndarray, np.ndarray | None, int]],
    partials: Iterable[float],
    norm_bound: float | None,
) -> float:
    """The verdict on an update from its slice sums (``slice_squares`` of each of
    ``slices``, in order): UpdateRejected NON_FINITE or NORM_BOUND, else the norm.

    Summed in the slices' order, so the norm has the same bits however the slice
    sums were computed (one thread or several). The finiteness check rides on the
    sums: a NaN or Inf value makes its slice's sum non-finite, and only then are
    the values themselves looked at.
    """
    total = 0.0
    for (name, flat, _, start), partial in zip(slices, partials):
        if not math.isfinite(partial):
            if not np.isfinite(flat[start : start + CHECK_CHUNK]).all():
                raise _reject(RejectReason.NON_FINITE, f"{name} holds NaN or Inf")
            # finite values whose float32 difference overflowed: an infinite
            # norm, which the bound rejects (as before)
        total += partial
    norm = total**0.5
    if norm_bound is not None and not norm <= norm_bound:  # a NaN norm (NaN reference) is refused too
        raise _reject(RejectReason.NORM_BOUND, f"update norm {norm:.4g} exceeds bound {norm_bound:.4g}")
    return norm


def check_values(
    adapter: Adapter, *, reference: Adapter | None = None, norm_bound: float | None = None
) -> float:
    """Finite values, and the L2 norm of (adapter - reference) under the bound.

    Returns that norm, which the round log records.

    Per slice of ``CHECK_CHUNK`` values (``slice_squares``), the slice sums
    added in a fixed order (``judge_values``). No BLAS, no float64 copy of a
    whole tensor: the same update gives the same bits whatever else the machine
    runs (np.dot through OpenBLAS did not — its result depended on its thread
    count, and its threads spun on a loaded machine). Here on one thread, lazily,
    so a non-finite value early in the update stops the work there;
    strategies/checked_sum.py computes the same slice sums on several threads.
    """
    slices = norm_slices(adapter, reference)
    scratch = NormScratch()
    partials = (total for _, flat, base in norm_tensors(slices) for total in tensor_squares(flat, base, scratch))
    return judge_values(slices, partials, norm_bound)
