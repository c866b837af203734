"""Adapter tensors ⇄ Flower records, and the checks applied to what arrives.

Layout inside a Flower ``RecordDict``:

* ``HEADER_RECORD`` (ConfigRecord) — ``{"bytes": UpdateHeader serialized}``
* ``TENSORS_RECORD`` (ArrayRecord) — one Array per TensorSpec, keyed by name

Flower's ArrayRecord rejects bfloat16 and knows nothing of our quantization,
so each Array holds the *encoded* values (float32, float16 or int8) and the
header's TensorSpec says how to decode them. ``decode`` trusts nothing: it
parses the header, matches every spec to exactly one Array of the announced
dtype and shape, and decodes to float32. ``check_header`` and
``check_values`` then compare against what the receiver expects.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from numpy.lib import format as npy_format
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from google.protobuf.message import DecodeError

from protos.adapter import Adapter, LoraSpec
from protos.errors import RejectReason, UpdateRejected
from protos.silotune.v1 import update_pb2 as pb

PROTOCOL_VERSION = 1
HEADER_RECORD = "silotune.header"
TENSORS_RECORD = "silotune.tensors"

Encoding = pb.Encoding
Kind = pb.Kind
UpdateHeader = pb.UpdateHeader

_WIRE_DTYPE = {pb.FP32: np.dtype("<f4"), pb.FP16: np.dtype("<f2"), pb.INT8: np.dtype("i1")}
ENCODINGS = {"fp32": pb.FP32, "fp16": pb.FP16, "int8": pb.INT8}


def encoding_from_name(name: str) -> int:
    try:
        return ENCODINGS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown encoding {name!r}; valid: {sorted(ENCODINGS)}") from None


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


def _encode_tensor(name: str, values: np.ndarray, encoding: int) -> tuple[pb.TensorSpec, np.ndarray]:
    values = np.asarray(values, dtype=np.float32)
    spec = pb.TensorSpec(name=name, shape=list(values.shape), dtype="float32", encoding=encoding)
    if encoding == pb.FP32:
        wire = np.ascontiguousarray(values, dtype="<f4")
    elif encoding == pb.FP16:
        wire = values.astype("<f2")
    elif encoding == pb.INT8:
        peak = float(np.max(np.abs(values))) if values.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        wire = np.clip(np.rint(values / scale), -127, 127).astype("i1")
        spec.scale = scale
    else:
        raise ValueError(f"unsupported encoding {encoding}")
    return spec, wire


def encode(
    adapter: Adapter,
    *,
    kind: int,
    job_id: str,
    server_round: int,
    fingerprint: str,
    lora: LoraSpec,
    num_examples: int = 0,
    metrics: Mapping[str, float] | None = None,
    encoding: int = pb.FP32,
) -> RecordDict:
    """Pack an adapter and its header into a RecordDict ready for a Message."""
    header = pb.UpdateHeader(
        protocol_version=PROTOCOL_VERSION,
        kind=kind,
        job_id=job_id,
        round=server_round,
        base_model_fingerprint=fingerprint,
        adapter=adapter_config_proto(lora),
        num_examples=num_examples,
    )
    for key, value in (metrics or {}).items():
        header.metrics[key] = float(value)
    arrays: dict[str, Array] = {}
    for name in sorted(adapter):
        spec, wire = _encode_tensor(name, adapter[name], encoding)
        header.tensors.append(spec)
        arrays[name] = Array(wire)
    return RecordDict(
        {
            HEADER_RECORD: ConfigRecord({"bytes": header.SerializeToString()}),
            TENSORS_RECORD: ArrayRecord(array_dict=arrays, keep_input=True),
        }
    )


def _reject(reason: RejectReason, detail: str) -> UpdateRejected:
    return UpdateRejected(reason, detail)


def decode(content: RecordDict) -> tuple[pb.UpdateHeader, Adapter]:
    """Parse header and tensors; raise UpdateRejected on any inconsistency."""
    try:
        header_record = content.config_records[HEADER_RECORD]
        arrays = content.array_records[TENSORS_RECORD]
    except KeyError as missing:
        raise _reject(RejectReason.MALFORMED, f"record {missing} absent") from None
    raw = header_record.get("bytes")
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
            f"protocol {header.protocol_version}, this side speaks {PROTOCOL_VERSION}",
        )
    spec_names = [t.name for t in header.tensors]
    if len(set(spec_names)) != len(spec_names):
        raise _reject(RejectReason.TENSOR_NAMES, "a tensor is announced twice")
    if set(spec_names) != set(arrays.keys()):
        extra = sorted(set(arrays.keys()) - set(spec_names))[:3]
        missing = sorted(set(spec_names) - set(arrays.keys()))[:3]
        raise _reject(RejectReason.TENSOR_NAMES, f"header/arrays differ: extra {extra}, missing {missing}")
    adapter: Adapter = {}
    for spec in header.tensors:
        adapter[spec.name] = _decode_tensor(spec, arrays[spec.name])
    return header, adapter


def _decode_tensor(spec: pb.TensorSpec, array: Array) -> np.ndarray:
    wire_dtype = _WIRE_DTYPE.get(spec.encoding)
    if wire_dtype is None:
        raise _reject(RejectReason.TENSOR_DTYPE, f"{spec.name}: unknown encoding {spec.encoding}")
    if spec.dtype != "float32":
        raise _reject(RejectReason.TENSOR_DTYPE, f"{spec.name}: logical dtype {spec.dtype!r}")
    shape = tuple(int(d) for d in spec.shape)
    if any(d < 0 for d in shape) or tuple(array.shape) != shape:
        raise _reject(RejectReason.TENSOR_SHAPE, f"{spec.name}: array {tuple(array.shape)} vs spec {shape}")
    try:
        wire = _wire_view(array)
    except Exception as err:  # a corrupt Array buffer must not crash the round
        raise _reject(RejectReason.MALFORMED, f"{spec.name}: array does not deserialize: {err}") from None
    if wire.dtype != wire_dtype:
        raise _reject(RejectReason.TENSOR_DTYPE, f"{spec.name}: array {wire.dtype} vs encoding {wire_dtype}")
    if tuple(wire.shape) != shape:
        raise _reject(RejectReason.TENSOR_SHAPE, f"{spec.name}: data {tuple(wire.shape)} vs spec {shape}")
    if spec.encoding == pb.INT8:
        if not np.isfinite(spec.scale) or spec.scale <= 0:
            raise _reject(RejectReason.NON_FINITE, f"{spec.name}: int8 scale {spec.scale}")
        return wire.astype(np.float32) * np.float32(spec.scale)
    # fp32: the read-only view itself; fp16: one conversion
    return wire if wire.dtype == np.float32 else wire.astype(np.float32)


def _wire_view(array: Array) -> np.ndarray:
    """The Array's values as a read-only view over its bytes, without a copy.

    Flower's ``Array.numpy()`` copies the payload through ``np.load``; on the
    coordinator, where every update is decoded once, that copy was the largest
    single cost (benchmarks/RESULTS.md). The .npy header is parsed here and
    the data is viewed in place; anything that tries to write to it fails.
    """
    data = array.data
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
    offset = stream.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{len(data) - offset} data bytes for {count} values of {dtype}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


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


def check_values(
    adapter: Adapter, *, reference: Adapter | None = None, norm_bound: float | None = None
) -> float:
    """Finite values, and the L2 norm of (adapter - reference) under the bound.

    Returns that norm, which the round log records.
    """
    total = 0.0
    for name, values in adapter.items():
        if not np.all(np.isfinite(values)):
            raise _reject(RejectReason.NON_FINITE, f"{name} holds NaN or Inf")
        delta = values if reference is None else values - reference[name]
        total += float(np.dot(delta.ravel().astype(np.float64), delta.ravel().astype(np.float64)))
    norm = total**0.5
    if norm_bound is not None and norm > norm_bound:
        raise _reject(RejectReason.NORM_BOUND, f"update norm {norm:.4g} exceeds bound {norm_bound:.4g}")
    return norm
