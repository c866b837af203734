"""Fuzzing the coordinator's update validation with malformed replies.

Three scripted organizations (the in-memory ScriptedGrid of
test_round_loop.py) answer round 2 of a tiny-llama job: nodes 1 and 2 are
honest, node 3 sends a reply that hypothesis builds from a *valid* one by
applying one to three mutations — header fields (protocol, kind, job, round,
fingerprint, adapter config, num_examples), tensor specs and arrays (dropped,
added, renamed, reshaped, other dtypes and encodings, truncated bytes, the
packed blob in the wrong place or in both),
values (NaN, Inf, huge norms, bad int8 scales), garbage or truncated header
bytes, missing records, oversized replies, a second reply from node 1, a copy
of node 1's update, a replay of node 1's round-1 update, an error reply,
header metrics that are not finite, out of bounds or too many.

Each example runs one real attempt of the round (``Job._attempt``: the same
on_reply → UpdateValidator → codec checks → strategy path as production), and
asserts that node 3's reply is rejected with a named RejectReason — the very
reason expected when a single mutation was applied — that both honest updates
are accepted, and that the aggregate equals, bit for bit, the one of the
honest replies alone. A second test runs whole jobs (Job.run, checkpoints) with
a fixed catalogue of attackers beside the honest organizations.

Evaluate replies are fuzzed the same way (``Job._evaluate``, the real
evaluate exchange): node 3's reply is built from a valid one with one to three
mutations of its records (the metrics record dropped, of the wrong type, extra
records, arrays) and metrics (lists, NaN/Inf, out-of-bounds loss, accuracy and
perplexity, num_examples absent, fractional, 0, negative, 10^12, above
eval-max-examples; bad or too many metric names, oversized), or replaced whole
(an error, a second reply from node 1, a reply from a node never asked); it may
also claim node 1's name or a name full of rich markup. Each must be refused
with its named reason, and the evaluation must be exactly the honest rows and
their overall.
"""

from __future__ import annotations

import copy
import math

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_round_loop import ScriptedGrid, config, honest

from protos import codec, encodings
from protos.errors import RejectReason
from protos.records import METRICS_RECORD, ORG_RECORD
from protos.round_config import CONFIG_RECORD, RoundConfig
from server.job import Job
from server.validation import EVALUATE_MAX_BYTES, MAX_METRIC_KEY, MAX_METRICS

R = RejectReason
FUZZ_NODE = 3
NORM_BOUND = 50.0          # honest deltas here have norms of about 10
ROUND = 2                  # round 1 is honest, so that round 2 has a round-1 update to replay


# ---- a draft reply, mutated, then built ------------------------------------------------

@dataclass
class Draft:
    header: codec.UpdateHeader
    arrays: dict[str, Array]
    header_value: Any = None          # replaces the header's "bytes" value when set
    drop_records: set[str] = field(default_factory=set)
    extra: dict[str, Any] = field(default_factory=dict)
    org: ConfigRecord | None = None
    src: int | None = None
    error: bool = False
    original: dict[str, tuple[int, ...]] = field(default_factory=dict)   # the valid shapes
    # where the packed blob travels (protocol 3): None, the canonical place for its size (inline
    # here: the tiny adapter is far below codec.INLINE_LIMIT); "array", "both", or "not-bytes" (inline as text)
    placement: str | None = None
    # the packed Array, as the sender lies about it (the blob then goes in the Array)
    packed_dtype: str | None = None     # its data in this dtype
    packed_shape: tuple[int, ...] | None = None   # its shape label, whatever its data
    cut: int = 0                        # its data this many bytes short

    @classmethod
    def of(cls, content: RecordDict) -> "Draft":
        header = codec.UpdateHeader()
        header.ParseFromString(content.config_records[codec.HEADER_RECORD]["bytes"])
        arrays = {name: Array(np.ascontiguousarray(wire)) for name, wire in codec.wire_views(content).items()}
        return cls(header, arrays, original={t.name: tuple(t.shape) for t in header.tensors})

    def spec(self, index: int) -> Any:
        return self.header.tensors[index % len(self.header.tensors)] if self.header.tensors else None

    def build(self, instruction: Message) -> Message:
        if self.error:
            reply = Message(Error(code=1, reason="fuzz: the ClientApp failed"), reply_to=instruction)
        else:
            header, blob = self.packed()
            value = header.SerializeToString() if self.header_value is None else self.header_value
            fields: dict[str, Any] = {} if value is _ABSENT else {codec.HEADER_KEY: value}
            records: dict[str, Any] = {codec.HEADER_RECORD: ConfigRecord(fields)}
            if blob is not None:
                lies = self.packed_dtype is not None or self.packed_shape is not None or self.cut
                to_array = lies or self.placement in ("array", "both") or blob.size > codec.INLINE_LIMIT
                if self.placement == "not-bytes":
                    fields[codec.INLINE_KEY] = blob.tobytes().hex()
                elif self.placement == "both" or not to_array:
                    fields[codec.INLINE_KEY] = blob.tobytes()
                if to_array and self.placement != "not-bytes":
                    records[codec.TENSORS_RECORD] = ArrayRecord(
                        array_dict={codec.PACKED_ARRAY: self.lied_array(blob)}, keep_input=True)
                if codec.TENSORS_RECORD in self.drop_records:   # the tensors dropped, wherever they travel
                    fields.pop(codec.INLINE_KEY, None)
                records[codec.HEADER_RECORD] = ConfigRecord(fields)
            if self.org is not None:
                records["organization"] = self.org
            records.update(self.extra)
            for name in self.drop_records:
                records.pop(name, None)
            reply = Message(RecordDict(records), reply_to=instruction)
        if self.src is not None:
            reply.metadata.__dict__["_src_node_id"] = self.src
        return reply


    def packed(self) -> tuple[codec.UpdateHeader, np.ndarray | None]:
        """The tensors as a sender packs them: the announced ones' bytes in name order, each at the
        next multiple of 64 (an announced tensor without bytes: an empty segment), then the bytes
        of arrays no spec announces; the header's segments set to match. None: no bytes at all."""
        header = codec.UpdateHeader()
        header.CopyFrom(self.header)
        raw = {name: np.ascontiguousarray(array.numpy()).reshape(-1).view(np.uint8)
               for name, array in self.arrays.items()}
        announced = sorted(header.tensors, key=lambda spec: spec.name)
        parts, at = [], 0
        for spec in announced:
            spec.offset = -(-at // 64) * 64
            spec.nbytes = raw[spec.name].size if spec.name in raw else 0
            at = spec.offset + spec.nbytes
            parts.append((spec.offset, raw.get(spec.name, np.zeros(0, np.uint8))))
        for name in sorted(set(raw) - {spec.name for spec in announced}):
            offset = -(-at // 64) * 64
            parts.append((offset, raw[name]))
            at = offset + raw[name].size
        if not parts:
            return header, None
        blob = np.zeros(at, np.uint8)
        for offset, data in parts:
            blob[offset : offset + data.size] = data
        return header, blob

    def lied_array(self, blob: np.ndarray) -> Array:
        """``blob`` as the packed Array, with the lies told about it."""
        array = Array(blob)
        if self.packed_dtype is not None:
            dtype = np.dtype(self.packed_dtype)
            array = (Array(np.ascontiguousarray(blob.view(dtype))) if blob.size % dtype.itemsize == 0 else
                     Array(dtype=str(dtype), shape=array.shape, stype=array.stype, data=array.data))
        if self.packed_shape is not None:
            shape = self.packed_shape if tuple(self.packed_shape) != tuple(array.shape) else (array.shape[0] + 1,)
            array = Array(dtype=array.dtype, shape=shape, stype=array.stype, data=array.data)
        if self.cut:
            array = Array(dtype=array.dtype, shape=array.shape, stype=array.stype,
                          data=array.data[: max(0, len(array.data) - self.cut)])
        return array


_ABSENT = object()


def _wire(array: Array) -> np.ndarray:
    return array.numpy()


def _replace_values(draft: Draft, index: int, change: Callable[[np.ndarray], np.ndarray],
                    keep_dtype: bool = True) -> str | None:
    """Change one tensor's wire values; by default in its current wire dtype, so that
    a value mutation never repairs (or adds) a dtype mismatch made by another one."""
    spec = draft.spec(index)
    if spec is None or spec.name not in draft.arrays:
        return None
    try:
        values = _wire(draft.arrays[spec.name]).copy()
        with np.errstate(all="ignore"):
            changed = change(values)
            if keep_dtype:
                changed = changed.astype(values.dtype)
    except Exception:  # e.g. NaN into an int8 tensor made by another mutation: no change
        return None
    draft.arrays[spec.name] = Array(np.ascontiguousarray(changed))
    return spec.name


# ---- mutations: (name, parameters) → a change of the draft and the reason it must earn --

def m_protocol(d: Draft, version: int) -> set[R]:
    d.header.protocol_version = version
    return {R.PROTOCOL_VERSION}


def m_kind(d: Draft, kind: int) -> set[R]:
    d.header.kind = kind
    return {R.WRONG_KIND}


def m_job(d: Draft, suffix: str) -> set[R]:
    d.header.job_id = d.header.job_id + suffix
    return {R.WRONG_JOB}


def m_round(d: Draft, server_round: int) -> set[R]:
    d.header.round = server_round
    return {R.WRONG_ROUND}


def m_fingerprint(d: Draft, text: str) -> set[R]:
    d.header.base_model_fingerprint = "blake2b:" + text
    return {R.BASE_MODEL_MISMATCH}


def m_adapter(d: Draft, what: str, value: Any) -> set[R]:
    adapter = d.header.adapter
    if what == "rank":
        adapter.rank = value
    elif what == "alpha":
        adapter.alpha = value
    elif what == "dropout":
        adapter.dropout = value
    elif what == "targets":
        adapter.target_modules.append(value)
    else:  # no target module at all
        del adapter.target_modules[:]
    return {R.ADAPTER_CONFIG_MISMATCH}


def m_num_examples(d: Draft) -> set[R]:
    d.header.num_examples = 0
    return {R.NUM_EXAMPLES}


def m_drop(d: Draft, index: int, where: str) -> set[R]:
    spec = d.spec(index)
    if spec is None:
        return set()
    if where in ("array", "both"):
        d.arrays.pop(spec.name, None)
    if where in ("spec", "both"):  # every announcement of that name
        name = spec.name
        for announced in [t for t in d.header.tensors if t.name == name]:
            d.header.tensors.remove(announced)
    # packed: a spec without bytes is a segment of the wrong length; bytes without a spec, bytes left over;
    # both (in one draw or two): the names differ
    return {"array": {R.TENSOR_SHAPE}, "spec": {R.MALFORMED}, "both": set()}[where] | {R.TENSOR_NAMES}


def m_add(d: Draft, name: str, where: str) -> set[R]:
    name = "zz.fuzz." + name            # never the name of a real tensor
    if where in ("array", "both"):
        d.arrays[name] = Array(np.zeros((4, 64), "<f4"))
    if where in ("spec", "both"):
        d.header.tensors.add(name=name, shape=[4, 64], dtype="float32", encoding=codec.Encoding.Value("FP32"))
    return {"array": {R.MALFORMED}, "spec": {R.TENSOR_SHAPE}, "both": set()}[where] | {R.TENSOR_NAMES}


def m_rename(d: Draft, index: int, name: str) -> set[R]:
    spec = d.spec(index)
    if spec is None:
        return set()
    new = "zz.fuzz." + name
    if spec.name in d.arrays:
        d.arrays[new] = d.arrays.pop(spec.name)
    spec.name = new
    return {R.TENSOR_NAMES}


def m_announce_twice(d: Draft, index: int) -> set[R]:
    spec = d.spec(index)
    if spec is None:
        return set()
    d.header.tensors.add().CopyFrom(spec)
    return {R.TENSOR_NAMES}


def m_grow(d: Draft, index: int, axis: int, extra: int) -> set[R]:
    """A consistent spec and array, but not the shape the coordinator expects."""
    spec = d.spec(index)
    if spec is None or not len(spec.shape):
        return set()
    axis %= len(spec.shape)
    spec.shape[axis] += extra
    if spec.name in d.arrays:
        try:
            values = _wire(d.arrays[spec.name])
            pad = [(0, 0)] * values.ndim
            pad[axis % values.ndim] = (0, extra)
            d.arrays[spec.name] = Array(np.pad(values, pad))
        except Exception:
            pass
    return {R.TENSOR_SHAPE}


def m_spec_shape(d: Draft, index: int, shape: list[int]) -> set[R]:
    spec = d.spec(index)
    if spec is None or tuple(spec.shape) == tuple(shape) or tuple(shape) == d.original.get(spec.name):
        return set()
    del spec.shape[:]
    spec.shape.extend(shape)
    return {R.TENSOR_SHAPE}


def m_array_shape_label(d: Draft, index: int, shape: tuple[int, ...]) -> set[R]:
    """The packed Array's own shape metadata lies about its bytes."""
    d.packed_shape = shape
    # in the Array, where a blob this small is not canonical: refused as MALFORMED unless the label
    # is refused first (not 1-D)
    return {R.TENSOR_SHAPE, R.MALFORMED}


def m_logical_dtype(d: Draft, index: int, dtype: str) -> set[R]:
    spec = d.spec(index)
    if spec is None:
        return set()
    spec.dtype = dtype
    return {R.TENSOR_DTYPE}


def m_encoding(d: Draft, index: int, encoding: int) -> set[R]:
    """Announce another encoding than the data has (FP16/INT8/Q4/Q8 over float32, or unknown): an
    unknown one is refused as such, a known one by its segment's length, not what it takes."""
    spec = d.spec(index)
    if spec is None:
        return set()
    spec.encoding = encoding
    return {R.TENSOR_DTYPE} if encoding not in encodings.by_wire_id() else {R.TENSOR_SHAPE}


def m_wire_dtype(d: Draft, index: int, dtype: str) -> set[R]:
    """The packed Array's data in another dtype than uint8 (its label is checked first)."""
    if np.dtype(dtype) == np.uint8:
        return set()
    d.packed_dtype = dtype
    return {R.TENSOR_DTYPE}


def m_placement(d: Draft, placement: str) -> set[R]:
    """The packed blob in the Array although it is small, in both places, or inline as text."""
    if not d.arrays:
        return set()
    d.placement = placement
    return {R.MALFORMED}


def m_truncate(d: Draft, index: int, cut: int) -> set[R]:
    """The packed Array's data cut short of what its .npy header announces."""
    d.cut = cut
    return {R.MALFORMED}


def m_non_finite(d: Draft, index: int, position: int, value: float) -> set[R]:
    def poke(v: np.ndarray) -> np.ndarray:
        v.reshape(-1)[position % v.size] = value
        return v
    return {R.NON_FINITE} if _replace_values(d, index, poke) else set()


def m_huge(d: Draft, index: int, position: int, value: float) -> set[R]:
    def poke(v: np.ndarray) -> np.ndarray:
        v.reshape(-1)[position % v.size] += np.float32(value)
        return v
    return {R.NORM_BOUND, R.NON_FINITE} if _replace_values(d, index, poke) else set()  # twice: may overflow


def m_scale_all(d: Draft, index: int, factor: float) -> set[R]:
    return {R.NORM_BOUND, R.NON_FINITE} if _replace_values(d, index, lambda v: v * np.float32(factor)) else set()


def m_int8_scale(d: Draft, index: int, scale: float) -> set[R]:
    """A consistent int8 tensor whose scale is not a positive finite number."""
    spec = d.spec(index)
    if spec is None or not _replace_values(d, index, lambda v: np.clip(np.rint(v * 100), -127, 127).astype("i1"),
                                           keep_dtype=False):
        return set()
    spec.encoding = codec.Encoding.Value("INT8")
    spec.scale = scale
    return {R.NON_FINITE}


def _metric_key_ok(key: str) -> bool:
    return 0 < len(key) <= MAX_METRIC_KEY and key.isprintable()


def m_header_metric(d: Draft, key: str, value: float) -> set[R]:
    """A header metric: not finite, or a loss below zero (or under a name that is no name)."""
    d.header.metrics[key] = value
    if not _metric_key_ok(key):
        return {R.MALFORMED}
    return {R.NON_FINITE} if not np.isfinite(value) else {R.METRIC_VALUE}


def m_header_metrics_many(d: Draft, count: int) -> set[R]:
    for i in range(count):
        d.header.metrics[f"m{i}"] = 1.0
    return {R.MALFORMED}


#: what a header of arbitrary bytes can earn: any check after the parse
ANY_HEADER_REASON = {R.MALFORMED, R.PROTOCOL_VERSION, R.WRONG_KIND, R.WRONG_JOB, R.WRONG_ROUND,
                     R.BASE_MODEL_MISMATCH, R.ADAPTER_CONFIG_MISMATCH, R.TENSOR_NAMES, R.TENSOR_SHAPE,
                     R.TENSOR_DTYPE, R.NON_FINITE, R.NUM_EXAMPLES, R.METRIC_VALUE}


def m_header_garbage(d: Draft, data: bytes) -> set[R]:
    d.header_value = data
    return ANY_HEADER_REASON


def m_header_truncated(d: Draft, keep: int) -> set[R]:
    raw = d.header.SerializeToString()
    d.header_value = raw[: keep % len(raw)]
    return ANY_HEADER_REASON


def m_header_type(d: Draft, value: Any) -> set[R]:
    d.header_value = value
    return {R.MALFORMED}


def m_drop_record(d: Draft, which: str) -> set[R]:
    d.drop_records.add(codec.HEADER_RECORD if which == "header" else codec.TENSORS_RECORD)
    return {R.MALFORMED}


def m_oversized(d: Draft, where: str, extra: int) -> set[R]:
    size = LIMIT + extra
    if where == "array":
        d.extra["padding"] = ArrayRecord(array_dict={"pad": Array(np.zeros(size, "u1"))}, keep_input=True)
    elif where == "config":
        d.extra["padding"] = ConfigRecord({"pad": b"\0" * size})
    else:
        d.org = ConfigRecord({"name": "x" * size})
    return {R.OVERSIZED}


def m_org_record(d: Draft, value: Any) -> set[R]:
    """Not a rejection by itself: an odd organization record must not crash the round."""
    d.org = ConfigRecord({} if value is None else {"name": value})
    return set()


REPLACEMENTS = {  # whole replies, not combined with other mutations
    "second reply from node 1": {R.DUPLICATE},
    "reply from a node never asked": {R.MALFORMED},
    "copy of node 1's update": {R.DUPLICATE},
    "copy of node 1's update, other num_examples": {R.DUPLICATE},
    "node 1's round-1 update replayed": {R.WRONG_ROUND},
    "node 1's round-1 update replayed as round 2": {R.DUPLICATE},
    "error reply": {R.CLIENT_ERROR},
}

LIMIT = 0  # the job's max-update-bytes (derived), set by the fixture
SEEN: Counter[str] = Counter()   # reasons the fuzz test met, for the coverage check after it


# ---- hypothesis strategies -----------------------------------------------------------

idx = st.integers(0, 63)
small_text = st.text(min_size=1, max_size=12)

MUTATIONS = st.one_of(
    st.tuples(st.just(m_protocol), st.integers(0, 2**32 - 1).filter(lambda v: v != codec.PROTOCOL_VERSION)),
    st.tuples(st.just(m_kind), st.sampled_from([0, 1, 3, 17, 2**31 - 1])),
    st.tuples(st.just(m_job), small_text),
    st.tuples(st.just(m_round), st.integers(0, 2**32 - 1).filter(lambda v: v != ROUND)),
    st.tuples(st.just(m_fingerprint), small_text),
    st.tuples(st.just(m_adapter), st.just("rank"), st.integers(-(2**31), 2**31 - 1).filter(lambda v: v != 4)),
    st.tuples(st.just(m_adapter), st.just("alpha"),
              st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: v != 16.0)),
    st.tuples(st.just(m_adapter), st.just("dropout"), st.floats(allow_nan=True).filter(lambda v: v != 0)),
    st.tuples(st.just(m_adapter), st.just("targets"), st.sampled_from(["k_proj", "o_proj", "q_proj", ""])),
    st.tuples(st.just(m_adapter), st.just("no-targets"), st.none()),
    st.tuples(st.just(m_num_examples)),
    st.tuples(st.just(m_drop), idx, st.sampled_from(["array", "spec", "both"])),
    st.tuples(st.just(m_add), small_text, st.sampled_from(["array", "spec", "both"])),
    st.tuples(st.just(m_rename), idx, small_text),
    st.tuples(st.just(m_announce_twice), idx),
    st.tuples(st.just(m_grow), idx, st.integers(0, 1), st.integers(1, 5)),
    st.tuples(st.just(m_spec_shape), idx, st.lists(st.integers(-3, 70), max_size=3)),
    st.tuples(st.just(m_array_shape_label), idx, st.lists(st.integers(0, 70), max_size=3).map(tuple)),
    st.tuples(st.just(m_logical_dtype), idx, st.sampled_from(["float16", "bfloat16", "int8", "", "float64"])),
    st.tuples(st.just(m_encoding), idx, st.sampled_from([0, 2, 3, 4, 5, 99, 2**31 - 1])),
    st.tuples(st.just(m_wire_dtype), idx, st.sampled_from(["<f8", "<i4", "<i8", "u1", ">f4", "<u2"])),
    st.tuples(st.just(m_truncate), idx, st.integers(1, 1200)),
    st.tuples(st.just(m_placement), st.sampled_from(["array", "both", "not-bytes"])),
    st.tuples(st.just(m_non_finite), idx, st.integers(0, 10**6), st.sampled_from([np.nan, np.inf, -np.inf])),
    st.tuples(st.just(m_huge), idx, st.integers(0, 10**6),
              st.floats(100, 1e30) | st.floats(-1e30, -100)),
    st.tuples(st.just(m_scale_all), idx, st.floats(1e3, 1e20) | st.floats(-1e20, -1e3)),
    st.tuples(st.just(m_int8_scale), idx, st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.5, -1e-9])),
    st.tuples(st.just(m_header_garbage), st.binary(max_size=300)),
    st.tuples(st.just(m_header_truncated), st.integers(0, 10**6)),
    st.tuples(st.just(m_header_type), st.sampled_from(["text, not bytes", 7, 1.5, True, [b"a"], _ABSENT])),
    st.tuples(st.just(m_drop_record), st.sampled_from(["header", "tensors"])),
    st.tuples(st.just(m_oversized), st.sampled_from(["array", "config", "org"]), st.integers(1, 4096)),
    st.tuples(st.just(m_header_metric), st.sampled_from(["train_loss", "train_steps"]) | small_text,
              st.sampled_from([np.nan, np.inf, -np.inf])),
    st.tuples(st.just(m_header_metric), st.just("train_loss"), st.floats(-1e30, -1e-9)),
    st.tuples(st.just(m_header_metrics_many), st.integers(MAX_METRICS + 1, 3 * MAX_METRICS)),
)

SIDE_TWEAKS = st.none() | st.tuples(st.just(m_org_record),
                                      st.sampled_from([None, 7, "", "x" * 500, "bad\nname", "org-1", b"\xff"]))

RECIPES = st.integers(0, 99).flatmap(lambda dice: (   # ~15% whole-reply replacements
    st.tuples(st.just("replace"), st.sampled_from(sorted(REPLACEMENTS))) if dice < 15 else
    st.tuples(st.just("mutate"), st.lists(MUTATIONS, min_size=1, max_size=3), SIDE_TWEAKS)))


# ---- evaluate replies: a draft, its mutations, the reasons they must earn -----------------

EVAL_MAX = 64   # the arena's eval-max-examples (the default)


@dataclass
class EvalDraft:
    metrics: dict[str, Any] | None
    as_config: bool = False                       # the metrics sent as a ConfigRecord
    org: ConfigRecord | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self, instruction: Message) -> Message:
        records: dict[str, Any] = {}
        if self.metrics is not None:
            records[METRICS_RECORD] = (ConfigRecord(self.metrics) if self.as_config else MetricRecord(self.metrics))
        if self.org is not None:
            records[ORG_RECORD] = self.org
        records.update(self.extra)
        return Message(RecordDict(records), reply_to=instruction)


def e_drop_metrics(d: EvalDraft) -> set[R]:
    d.metrics = None
    return {R.MALFORMED}


def e_as_config(d: EvalDraft) -> set[R]:
    if d.metrics is None:
        return set()
    d.as_config = True
    return {R.MALFORMED}


def e_extra_record(d: EvalDraft, kind: str, name: str) -> set[R]:
    name = "zz.fuzz." + name
    if kind == "metric":
        d.extra[name] = MetricRecord({"x": 1.0})
    elif kind == "config":
        d.extra[name] = ConfigRecord({"x": "y"})
    else:
        d.extra[name] = ArrayRecord(array_dict={"x": Array(np.zeros(8, "<f4"))}, keep_input=True)
    return {R.MALFORMED}


def e_set(d: EvalDraft, key: str, value: Any, reasons: set[R]) -> set[R]:
    if d.metrics is None:
        return set()
    d.metrics[key] = value
    return reasons if _metric_key_ok(key) else {R.MALFORMED}


def e_list(d: EvalDraft, key: str, values: list[float]) -> set[R]:
    return e_set(d, key, values, {R.METRIC_VALUE})


def e_non_finite(d: EvalDraft, key: str, value: float) -> set[R]:
    return e_set(d, key, value, {R.NON_FINITE})


def e_count(d: EvalDraft, value: int | float) -> set[R]:
    reasons = {R.NON_FINITE} if isinstance(value, float) and not np.isfinite(value) else {R.NUM_EXAMPLES}
    return e_set(d, "num_examples", value, reasons)


def e_bound(d: EvalDraft, key: str, value: float) -> set[R]:
    return e_set(d, key, value, {R.METRIC_VALUE})


def e_drop_key(d: EvalDraft, key: str) -> set[R]:
    if d.metrics is None:
        return set()
    d.metrics.pop(key, None)
    return {R.NUM_EXAMPLES} if key == "num_examples" else set()   # loss, accuracy: optional


def e_bad_key(d: EvalDraft, key: str) -> set[R]:
    return e_set(d, key, 1.0, {R.MALFORMED})


def e_many(d: EvalDraft, count: int) -> set[R]:
    if d.metrics is None:
        return set()
    d.metrics.update({f"m{i}": float(i) for i in range(count)})
    return {R.MALFORMED}


def e_oversized(d: EvalDraft, where: str, extra: int) -> set[R]:
    if where == "metric" and d.metrics is not None:
        d.metrics["pad"] = [0.0] * ((EVALUATE_MAX_BYTES + extra) // 8 + 1)
    else:
        d.org = ConfigRecord({"name": "x" * (EVALUATE_MAX_BYTES + extra)})
    return {R.OVERSIZED}


EVAL_REPLACEMENTS = {
    "error reply": {R.CLIENT_ERROR},
    "empty reply": {R.MALFORMED},
    "second reply from node 1": {R.DUPLICATE},
    "reply from a node never asked": {R.MALFORMED},
}

NAMES = st.none() | st.sampled_from(["org-0.1", "org-0.3", "[/bold]", "[red]x[/red]", "node-1", "overall", "",
                                     "a\nb", "[link=http://x]y"])
METRIC_KEYS = st.sampled_from(["num_examples", "loss", "accuracy", "perplexity", "resident_pid"]) | small_text

EVAL_MUTATIONS = st.one_of(
    st.tuples(st.just(e_drop_metrics)),
    st.tuples(st.just(e_as_config)),
    st.tuples(st.just(e_extra_record), st.sampled_from(["metric", "config", "array"]), small_text),
    st.tuples(st.just(e_list), METRIC_KEYS, st.lists(st.floats(0, 1), max_size=4)),
    st.tuples(st.just(e_non_finite), METRIC_KEYS, st.sampled_from([np.nan, np.inf, -np.inf])),
    st.tuples(st.just(e_count), st.sampled_from([10**12, -5, 0, EVAL_MAX + 1, 2**62, 10**30, -(10**12)])
              | st.integers(EVAL_MAX + 1, 2**63 - 1) | st.integers(-(2**63), 0)
              | st.floats(0.01, EVAL_MAX).filter(lambda v: not v.is_integer())
              | st.floats(EVAL_MAX + 1, 1e300) | st.sampled_from([np.nan, np.inf, -np.inf])),
    st.tuples(st.just(e_bound), st.just("loss"), st.floats(-1e30, -1e-12)),
    st.tuples(st.just(e_bound), st.just("accuracy"), st.floats(1.0001, 1e30) | st.floats(-1e30, -1e-12)),
    st.tuples(st.just(e_bound), st.just("perplexity"), st.floats(-1e30, 0.9999)),
    st.tuples(st.just(e_drop_key), st.just("num_examples")),   # not loss: that could undo a bad loss drawn before
    st.tuples(st.just(e_bad_key), st.sampled_from(["", "bad\x00key", "k" * (MAX_METRIC_KEY + 1), "tab\tkey"])),
    st.tuples(st.just(e_many), st.integers(MAX_METRICS + 1, 3 * MAX_METRICS)),
    st.tuples(st.just(e_oversized), st.sampled_from(["metric", "org"]), st.integers(1, 4096)),
)

EVAL_RECIPES = st.integers(0, 99).flatmap(lambda dice: (
    st.tuples(st.just("replace"), st.sampled_from(sorted(EVAL_REPLACEMENTS))) if dice < 10 else
    st.tuples(st.just("mutate"), st.lists(EVAL_MUTATIONS, min_size=1, max_size=3), NAMES)))

SEEN_EVAL: Counter[str] = Counter()


# ---- the job under attack ---------------------------------------------------------------

def memoized(handler: Callable[[Message], Message]) -> Callable[[Message], Message]:
    """An honest organization's reply content, made once per (round, message type).

    Within the arena's round 2 the global never changes, so neither does an
    honest reply; decoding the instruction and encoding the reply 1000 times
    over would only slow the test down.
    """
    memo: dict[tuple[str, int], RecordDict] = {}

    def handle(message: Message) -> Message:
        key = (message.metadata.message_type,
               RoundConfig.from_record(message.content.config_records[CONFIG_RECORD]).server_round)
        if key not in memo:
            memo[key] = handler(message).content
        # a copy per reply, as the wire gives: the round loop empties each reply's arrays once
        # handled (deepcopy shares the immutable bytes, so this costs little)
        return Message(copy.deepcopy(memo[key]), reply_to=message)
    return handle


class Fuzzed:
    """Node 3's handler: builds the current recipe's reply from the instruction it got."""

    def __init__(self) -> None:
        self.base = memoized(honest(0.2))           # the valid reply every recipe starts from
        self.recipe: Any = None
        self.eval_recipe: Any = None                   # evaluate replies: valid unless set
        self.expected: set[R] = set()
        self.round1_reply: RecordDict | None = None   # node 1's round-1 content, for replays

    def __call__(self, message: Message) -> Message:
        if message.metadata.message_type == "evaluate":
            return self.base(message) if self.eval_recipe is None else self._evaluate(message)
        if self.recipe is None:
            return self.base(message)
        kind, *rest = self.recipe
        if kind == "replace":
            return self._replacement(rest[0], message)
        mutations, tweak = rest
        draft = Draft.of(self.base(message).content)
        if tweak is not None:   # first: an oversized organization record below must stay oversized
            tweak[0](draft, *tweak[1:])
        expected: set[R] = set()
        for mutation, *params in mutations:
            expected |= mutation(draft, *params)
        if not expected:   # every mutation drawn found nothing to change: make it a clear-cut one
            expected = m_num_examples(draft)
        self.expected = expected
        return draft.build(message)

    def _evaluate(self, message: Message) -> Message:
        kind, *rest = self.eval_recipe
        if kind == "replace":
            what = rest[0]
            self.expected = EVAL_REPLACEMENTS[what]
            if what == "error reply":
                return Message(Error(code=1, reason="fuzz: [/bold] the evaluator failed\n"), reply_to=message)
            if what == "empty reply":
                return Message(RecordDict(), reply_to=message)
            reply = self.base(message)
            reply.metadata.__dict__["_src_node_id"] = 1 if what == "second reply from node 1" else 77
            return reply
        mutations, name = rest
        draft = EvalDraft(dict(self.base(message).content.metric_records[METRICS_RECORD]))
        if name is not None:
            draft.org = ConfigRecord({"name": name})
        expected: set[R] = set()
        for mutation, *params in mutations:
            expected |= mutation(draft, *params)
        if not expected:
            expected = e_drop_key(draft, "num_examples")
        self.expected = expected
        return draft.build(message)

    def _replacement(self, what: str, message: Message) -> Message:
        self.expected = REPLACEMENTS[what]
        if what == "second reply from node 1":
            reply = self.base(message)
            reply.metadata.__dict__["_src_node_id"] = 1
            return reply
        if what == "reply from a node never asked":
            reply = self.base(message)
            reply.metadata.__dict__["_src_node_id"] = 77
            return reply
        if what == "copy of node 1's update":
            return honest(0.1)(message)
        if what == "copy of node 1's update, other num_examples":
            return honest(0.1, num_examples=99)(message)
        if what == "error reply":
            return Draft(codec.UpdateHeader(), {}, error=True).build(message)
        assert self.round1_reply is not None
        draft = Draft.of(self.round1_reply)
        if what == "node 1's round-1 update replayed as round 2":
            draft.header.round = ROUND
        return draft.build(message)


class Arena:
    def __init__(self, job: Job, state: Any, grid: ScriptedGrid, fuzzed: Fuzzed,
                 honest_only: dict[str, np.ndarray]) -> None:
        self.job, self.state, self.grid, self.fuzzed, self.honest_only = job, state, grid, fuzzed, honest_only

    def __repr__(self) -> str:
        return "Arena(tiny-llama job, round 2, nodes 1 and 2 honest, node 3 fuzzed)"


@pytest.fixture(scope="module")
def arena(tmp_path_factory: pytest.TempPathFactory) -> Arena:
    global LIMIT
    fuzzed = Fuzzed()
    node1 = honest(0.1, eval_metrics=HONEST_EVAL[1])

    def recording_node1(message: Message) -> Message:
        reply = node1(message)
        if message.metadata.message_type == "train" and fuzzed.round1_reply is None:
            fuzzed.round1_reply = reply.content
        return reply

    grid = ScriptedGrid({1: memoized(recording_node1), 2: memoized(honest(0.3, eval_metrics=HONEST_EVAL[2])),
                         FUZZ_NODE: honest(0.5)})
    cfg = config(tmp_path_factory.mktemp("fuzz"), min_nodes=2, min_replies=2, norm_bound=NORM_BOUND)
    job = Job(grid, cfg)
    LIMIT = job.validator.max_update_bytes
    state = job._resume_or_init()
    _, _, accepted, rejected, _ = job._attempt(state, 1)  # round 1: everybody honest
    assert len(accepted) == 3 and not rejected
    state.adapter = job.strategy.finish_round()
    state.server_round = 1

    del grid.handlers[FUZZ_NODE]                            # round 2 of the honest alone
    _, _, accepted, rejected, _ = job._attempt(state, ROUND)
    assert len(accepted) == 2 and not rejected
    honest_only = {k: v.copy() for k, v in job.strategy.finish_round().items()}
    grid.handlers[FUZZ_NODE] = fuzzed
    return Arena(job, state, grid, fuzzed, honest_only)


@settings(max_examples=1000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(recipe=RECIPES)
@example(recipe=("mutate", [(m_encoding, 0, 4)], None))   # q4 announced over float32 data
def test_every_malformed_update_is_rejected_by_name_and_changes_nothing(arena: Arena, recipe: Any) -> None:
    arena.fuzzed.recipe = recipe
    _, result, accepted, rejected, _ = arena.job._attempt(arena.state, ROUND)
    assert result.timed_out == []
    assert len(accepted) == 2, (recipe, accepted, rejected)
    assert len(rejected) == 1, (recipe, rejected)
    reason = RejectReason(rejected[0]["reason"])           # a named reason, one of ours
    SEEN[reason.value] += 1
    assert reason in arena.fuzzed.expected, (recipe, rejected[0], arena.fuzzed.expected)
    final = arena.job.strategy.finish_round()
    assert sorted(final) == sorted(arena.honest_only)
    for name, value in final.items():
        assert value.dtype == arena.honest_only[name].dtype
        assert value.tobytes() == arena.honest_only[name].tobytes(), (recipe, name)


def test_the_fuzzing_reached_every_check() -> None:
    """Run after the fuzz test (file order): its examples met every reason a reply can earn."""
    if not SEEN:
        pytest.skip("the fuzz test did not run in this session")
    reachable = {R.MALFORMED, R.PROTOCOL_VERSION, R.WRONG_KIND, R.WRONG_JOB, R.WRONG_ROUND,
                 R.BASE_MODEL_MISMATCH, R.ADAPTER_CONFIG_MISMATCH, R.TENSOR_NAMES, R.TENSOR_SHAPE,
                 R.TENSOR_DTYPE, R.NON_FINITE, R.NORM_BOUND, R.NUM_EXAMPLES, R.CLIENT_ERROR, R.DUPLICATE,
                 R.OVERSIZED, R.METRIC_VALUE}   # all but STRATEGY_REFUSED (fedavg refuses nothing)
    assert set(SEEN) >= {r.value for r in reachable}, SEEN
    assert sum(SEEN.values()) >= 1000


HONEST_EVAL = {1: {"num_examples": 4.0, "loss": 1.0, "accuracy": 0.25},
               2: {"num_examples": 12.0, "loss": 2.0, "accuracy": 0.75}}
HONEST_OVERALL = {"num_examples": 16.0, "loss": 1.75, "accuracy": 0.625, "perplexity": math.exp(1.75)}


@settings(max_examples=1000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(recipe=EVAL_RECIPES)
def test_every_malformed_evaluate_reply_is_refused_by_name_and_changes_nothing(arena: Arena, recipe: Any) -> None:
    arena.fuzzed.eval_recipe = recipe
    try:
        summary = arena.job._evaluate(arena.state, {"round": arena.state.server_round})
    finally:
        arena.fuzzed.eval_recipe = None
        arena.state.history.pop()
    assert len(summary["eval_rejected"]) == 1, (recipe, summary["eval_rejected"])
    rejection = summary["eval_rejected"][0]
    reason = RejectReason(rejection["reason"])
    SEEN_EVAL[reason.value] += 1
    assert reason in arena.fuzzed.expected, (recipe, rejection, arena.fuzzed.expected)
    assert rejection["org"] == "org-0.5"                      # node 3's name, bound in round 0: never a claim's
    assert summary["eval"] == {"org-0.1": HONEST_EVAL[1], "org-0.3": HONEST_EVAL[2]}, recipe
    assert summary["eval_overall"] == pytest.approx(HONEST_OVERALL, rel=1e-12)


def test_the_evaluate_fuzzing_reached_every_check() -> None:
    if not SEEN_EVAL:
        pytest.skip("the evaluate fuzz test did not run in this session")
    reachable = {R.MALFORMED, R.NON_FINITE, R.NUM_EXAMPLES, R.METRIC_VALUE, R.CLIENT_ERROR, R.DUPLICATE, R.OVERSIZED}
    assert set(SEEN_EVAL) == {r.value for r in reachable}, SEEN_EVAL
    assert sum(SEEN_EVAL.values()) >= 1000


# ---- whole jobs: a catalogue of attackers beside two honest organizations ----------------

def _attacker(recipe: Any, fuzzed_round1: list[RecordDict], eval_recipe: Any = None) -> Callable[[Message], Message]:
    def handle(message: Message) -> Message:
        fuzzed = Fuzzed()
        fuzzed.recipe = recipe
        fuzzed.eval_recipe = eval_recipe
        if fuzzed_round1:
            fuzzed.round1_reply = fuzzed_round1[0]
        return fuzzed(message)
    return handle


CATALOGUE = [
    ("mutate", [(m_round, 7)], None),
    ("mutate", [(m_fingerprint, "another-model")], None),
    ("mutate", [(m_adapter, "rank", 0)], (m_org_record, None)),
    ("mutate", [(m_non_finite, 2, 5, np.nan)], None),
    ("mutate", [(m_huge, 1, 0, 1e6)], None),
    ("mutate", [(m_truncate, 0, 17)], None),
    ("mutate", [(m_header_garbage, b"\xff\xfe not a header")], None),
    ("mutate", [(m_oversized, "array", 1)], None),
    ("mutate", [(m_encoding, 3, 2)], (m_org_record, "x" * 500)),
    ("replace", "copy of node 1's update"),
    ("replace", "error reply"),
    ("mutate", [(m_header_metric, "train_loss", np.nan)], None),
]

EVAL_CATALOGUE = [   # what each attacker of CATALOGUE sends when asked to evaluate, in turn
    ("mutate", [(e_drop_metrics,)], "org-0.1"),
    ("mutate", [(e_list, "accuracy", [0.9, 1.0])], "[/bold]"),
    ("mutate", [(e_non_finite, "loss", np.nan)], None),
    ("mutate", [(e_count, 10**12)], "org-0.3"),
    ("mutate", [(e_count, -5)], None),
    ("mutate", [(e_bound, "accuracy", 40.0)], None),
    ("mutate", [(e_extra_record, "array", "a")], None),
    ("replace", "error reply"),
]


def test_whole_jobs_with_attackers_end_on_the_honest_adapter(tmp_path: Path) -> None:
    """Job.run end to end (two rounds, checkpoints): the attackers change nothing."""
    def run(attackers: dict[int, Any], where: str) -> tuple[Any, list[dict[str, Any]]]:
        round1: list[RecordDict] = []
        node1 = honest(0.1)

        def recording_node1(message: Message) -> Message:
            reply = node1(message)
            if message.metadata.message_type == "train" and not round1:
                round1.append(reply.content)
            return reply
        handlers = {1: recording_node1, 2: honest(0.3)}
        handlers.update({node: _attacker(recipe, round1, EVAL_CATALOGUE[i % len(EVAL_CATALOGUE)])
                         for i, (node, recipe) in enumerate(attackers.items())})
        grid = ScriptedGrid(handlers)
        cfg = config(tmp_path / where, num_rounds=2, min_nodes=len(handlers), min_replies=2,
                     norm_bound=NORM_BOUND)
        job = Job(grid, cfg)
        global LIMIT
        LIMIT = job.validator.max_update_bytes
        final = job.run()
        return final.adapter, final.run_state["history"]

    clean, _ = run({}, "honest")
    attackers = {10 + i: recipe for i, recipe in enumerate(CATALOGUE)}
    attacked, history = run(attackers, "attacked")
    for summary in history[1:]:
        assert len(summary["accepted"]) == 2
        assert len(summary["rejected"]) == len(CATALOGUE)
        assert all(r["reason"] in {x.value for x in RejectReason} for r in summary["rejected"])
    reasons = sorted(r["reason"] for r in history[1]["rejected"])
    assert reasons == sorted(["wrong_round", "base_model_mismatch", "adapter_config_mismatch", "non_finite",
                              "norm_bound", "malformed", "malformed", "oversized", "tensor_shape",
                              "duplicate", "client_error", "non_finite"])
    for summary in history:                          # round 0 and both rounds: only the honest rows
        assert sorted(summary["eval"]) == ["org-0.1", "org-0.3"], summary["eval"]
        assert len(summary["eval_rejected"]) == len(CATALOGUE)
        assert summary["eval_overall"]["num_examples"] == 8.0
    assert sorted(clean) == sorted(attacked)
    for name, value in clean.items():
        assert value.tobytes() == attacked[name].tobytes(), name
