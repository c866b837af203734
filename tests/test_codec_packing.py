"""Protocol version 3: all tensors of a message in one packed blob, inline in the header record up to
codec.INLINE_LIMIT and in one Array above it, and every bad placement or layout refused by name."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.inflatable.inflatable_object import get_object_tree, iterate_object_tree
from flwr.supercore.task_identity import TaskIdentity

from protos import codec
from protos.adapter import LoraSpec
from protos.encodings import ENCODINGS
from protos.errors import RejectReason, UpdateRejected

from server.exchange import _Collector
from codec_wire import blob_of, header_of, packed_bytes, repacked, set_array, set_blob, set_header, set_inline, wires

SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
UPDATE = codec.Kind.Value("UPDATE")
ALL = ["fp32", "fp16", "int8", "q4", "q8"]


def odd_adapter() -> dict[str, np.ndarray]:
    """Shapes whose wire sizes are no multiple of 64 (nor of q4/q8's block), an empty one and a
    single value, named so that name order is not insertion order."""
    rng = np.random.default_rng(5)
    shapes = {"z.big": (3, 43), "a.empty": (0, 4), "m.one": (1,), "b.block_plus_one": (65,), "c.seven": (7, 1)}
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}


def send(values, encoding: str = "fp32", **overrides):  # type: ignore[no-untyped-def]
    kwargs = dict(kind=UPDATE, job_id="job", server_round=1, fingerprint="fp", lora=SPEC, num_examples=4,
                  encoding=codec.encoding_from_name(encoding))
    kwargs.update(overrides)
    return codec.encode(values, **kwargs)


@pytest.fixture()
def array_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every non-empty blob goes in the Array: the Array path's checks, on small test adapters."""
    monkeypatch.setattr(codec, "INLINE_LIMIT", 0)


def rejection(content) -> UpdateRejected:  # type: ignore[no-untyped-def]
    with pytest.raises(UpdateRejected) as info:
        codec.decode(content)
    return info.value


@pytest.mark.parametrize("name", ALL)
def test_every_encoding_round_trips_in_one_packed_array(name: str, array_path: None) -> None:
    values = odd_adapter()
    content = send(values, name)
    arrays = content.array_records[codec.TENSORS_RECORD]
    assert list(arrays.keys()) == [codec.PACKED_ARRAY]
    array = arrays[codec.PACKED_ARRAY]
    assert array.dtype == "uint8" and len(array.shape) == 1
    header, decoded = codec.decode(content)
    specs = list(header.tensors)
    assert [s.name for s in specs] == sorted(values)
    at = 0
    for spec in specs:  # name order, each at the next multiple of 64, nothing after the last
        assert spec.offset == -(-at // 64) * 64 and spec.offset % 64 == 0
        at = spec.offset + spec.nbytes
    assert at == array.shape[0]
    encoding = ENCODINGS.get(name)
    for key, original in values.items():
        assert decoded[key].dtype == np.float32 and decoded[key].shape == original.shape
        error = float(np.max(np.abs(decoded[key] - original))) if original.size else 0.0
        assert error <= encoding.max_abs_error(original), (key, error)
        wire = wires(content)[key]
        assert wire.dtype == encoding.wire_dtype and wire.shape == encoding.wire_shape(original.shape)
        assert wire.flags.aligned and wire.ctypes.data % wire.dtype.alignment == 0
        assert np.shares_memory(wire, np.frombuffer(array.data, np.uint8)) or wire.size == 0


@pytest.mark.parametrize("placement", ["inline", "array"])
def test_fp32_views_are_aligned_read_only_and_keep_their_buffer_alive(placement: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if placement == "array":
        monkeypatch.setattr(codec, "INLINE_LIMIT", 0)
    values = odd_adapter()
    content = send(values)
    assert (codec.TENSORS_RECORD in content) == (placement == "array")
    _, decoded = codec.decode(content)
    for key, original in values.items():
        view = decoded[key]
        assert view.flags.aligned and not view.flags.writeable and np.array_equal(view, original)
    # what server/exchange.py's _Collector does once a reply is handled: the blob's bytes dropped
    collector, sent = _Collector(), sum(len(blob) for blob in _sent_blobs(content))
    collector.release(SimpleReply(content))
    assert collector.pending == sent > 0
    assert not any(_sent_blobs(content)), "release must empty the blob wherever it travels"
    del content
    gc.collect()
    for key, original in values.items():
        assert np.array_equal(decoded[key], original)


class SimpleReply:
    """What _Collector.release reads of a Message: its error flag and content."""

    def __init__(self, content: RecordDict) -> None:
        self.content = content

    def has_error(self) -> bool:
        return False


def _sent_blobs(content: RecordDict) -> list[bytes]:
    inline = content.config_records[codec.HEADER_RECORD].get(codec.INLINE_KEY)
    arrays = content.array_records.get(codec.TENSORS_RECORD)
    return ([inline] if inline is not None else []) + [a.data for a in (arrays.values() if arrays else [])]


def test_one_message_of_many_tensors_is_one_array(array_path: None) -> None:
    values = {f"layer.{i:02d}.lora_{ab}.weight": np.ones((4, 16), np.float32) for i in range(10) for ab in "AB"}
    content = send(values, "q8")
    assert len(content.array_records[codec.TENSORS_RECORD]) == 1
    assert set(codec.decode(content)[1]) == set(values)


def test_no_tensors_means_the_header_record_alone() -> None:
    """global-delta's "the same global": EncodedTensors((), {}) sends no blob and no TENSORS record."""
    content = codec.encode(None, kind=codec.Kind.Value("GLOBAL"), job_id="job", server_round=1, fingerprint="fp",
                           lora=SPEC, tensors=codec.EncodedTensors((), {}))
    assert set(content) == {codec.HEADER_RECORD} and packed_bytes(content) == 0
    assert set(content.config_records[codec.HEADER_RECORD]) == {codec.HEADER_KEY}
    assert codec.decode(content)[1] == {}
    assert codec.encode_tensors({}) == codec.EncodedTensors((), {})
    def empty_record(c):  # type: ignore[no-untyped-def]
        c[codec.TENSORS_RECORD] = ArrayRecord()   # what protocol 2 sent
        return c
    for sent in (lambda c: set_inline(c, b""), lambda c: set_array(c, np.zeros(0, np.uint8)), empty_record):
        _refused(sent(codec.encode(None, kind=codec.Kind.Value("GLOBAL"), job_id="job", server_round=1,
                                   fingerprint="fp", lora=SPEC, tensors=codec.EncodedTensors((), {}))),
                 RejectReason.MALFORMED, "no tensor announced")


def test_all_tensors_empty_still_send_an_inline_blob() -> None:
    """Tensors announced always come with a blob: of 0 bytes inline when every tensor is empty."""
    content = send({"a": np.zeros((0, 3), np.float32), "b": np.zeros((2, 0), np.float32)})
    assert set(content) == {codec.HEADER_RECORD}
    assert content.config_records[codec.HEADER_RECORD][codec.INLINE_KEY] == b""
    assert {k: v.shape for k, v in codec.decode(content)[1].items()} == {"a": (0, 3), "b": (2, 0)}


# ---- malformed layouts, each refused by name ---------------------------------------------------

def _relaid(change) -> object:  # type: ignore[no-untyped-def]
    """A q8 message of odd_adapter() whose header's specs ``change(specs_by_name)`` edits."""
    content = send(odd_adapter(), "q8")
    header = header_of(content)
    change({spec.name: spec for spec in header.tensors})
    return set_header(content, header)


def _refused(content, reason: RejectReason, *words: str) -> None:  # type: ignore[no-untyped-def]
    error = rejection(content)
    assert error.reason is reason, error
    for word in words:
        assert word in str(error), (word, str(error))


def test_a_segment_past_the_end_is_refused() -> None:
    content = send(odd_adapter(), "q8")
    blob = blob_of(content)
    set_blob(content, blob[:-1])  # the last segment (z.big) one byte short of its end
    _refused(content, RejectReason.MALFORMED, "z.big", "past the end")

    def far(specs):  # type: ignore[no-untyped-def]
        specs["z.big"].offset = 2**63
    _refused(_relaid(far), RejectReason.MALFORMED, "z.big", "gap")


def test_overlapping_segments_are_refused() -> None:
    def overlap(specs):  # type: ignore[no-untyped-def]
        specs["c.seven"].offset = specs["b.block_plus_one"].offset
    _refused(_relaid(overlap), RejectReason.MALFORMED, "c.seven", "overlaps b.block_plus_one")


def test_segments_out_of_name_order_are_refused() -> None:
    def swap(specs):  # type: ignore[no-untyped-def]
        specs["b.block_plus_one"].offset, specs["c.seven"].offset = specs["c.seven"].offset, 0
    _refused(_relaid(swap), RejectReason.MALFORMED, "b.block_plus_one")


def test_a_misaligned_or_gapped_segment_is_refused() -> None:
    def misaligned(specs):  # type: ignore[no-untyped-def]
        specs["m.one"].offset += 1
    _refused(_relaid(misaligned), RejectReason.MALFORMED, "m.one", "multiple of 64")

    def gap(specs):  # type: ignore[no-untyped-def]
        specs["m.one"].offset += 64
    _refused(_relaid(gap), RejectReason.MALFORMED, "m.one", "gap")


def test_a_wrong_nbytes_is_refused_against_the_encodings_wire_size() -> None:
    def longer(specs):  # type: ignore[no-untyped-def]
        specs["c.seven"].nbytes += 1
    _refused(_relaid(longer), RejectReason.TENSOR_SHAPE, "c.seven", "q8", "takes 9")

    def zero(specs):  # type: ignore[no-untyped-def]
        specs["z.big"].nbytes = 0
    _refused(_relaid(zero), RejectReason.TENSOR_SHAPE, "z.big")
    # a shape whose wire size does not fit an int64 is refused before it is computed
    def huge(specs):  # type: ignore[no-untyped-def]
        specs["z.big"].shape[:] = [2**40, 2**40]
    _refused(_relaid(huge), RejectReason.TENSOR_SHAPE, "z.big")


def test_trailing_bytes_and_non_zero_padding_are_refused() -> None:
    content = send(odd_adapter(), "q8")
    set_blob(content, np.append(blob_of(content), np.zeros(64, np.uint8)))
    _refused(content, RejectReason.MALFORMED, "64 bytes after the last segment", "z.big")

    content = send(odd_adapter(), "q8")
    specs = {spec.name: spec for spec in header_of(content).tensors}
    blob = blob_of(content)
    assert specs["m.one"].offset > specs["c.seven"].offset + specs["c.seven"].nbytes  # there is padding
    blob[specs["c.seven"].offset + specs["c.seven"].nbytes] = 1
    set_blob(content, blob)
    _refused(content, RejectReason.MALFORMED, "m.one", "padding")


def test_the_packed_array_must_be_one_uint8_array(array_path: None) -> None:
    content = send(odd_adapter())
    set_blob(content, blob_of(content).view(np.int8))
    _refused(content, RejectReason.TENSOR_DTYPE, "int8")

    content = send(odd_adapter())
    set_blob(content, blob_of(content).reshape(1, -1))
    _refused(content, RejectReason.TENSOR_SHAPE, "expected 1-D")

    content = send(odd_adapter())
    arrays = content.array_records[codec.TENSORS_RECORD]
    a = arrays[codec.PACKED_ARRAY]  # its shape label lies about its data
    arrays[codec.PACKED_ARRAY] = Array(dtype=a.dtype, shape=(a.shape[0] + 64,), stype=a.stype, data=a.data)
    _refused(content, RejectReason.TENSOR_SHAPE, "announced")

    content = send(odd_adapter())
    arrays = content.array_records[codec.TENSORS_RECORD]
    a = arrays[codec.PACKED_ARRAY]  # announced uint8, its bytes a float32 .npy
    arrays[codec.PACKED_ARRAY] = Array(dtype="uint8", shape=a.shape, stype=a.stype,
                                       data=Array(np.zeros(a.shape[0] // 4, np.float32)).data)
    _refused(content, RejectReason.TENSOR_DTYPE, "float32")

    content = send(odd_adapter())
    packed = content.array_records[codec.TENSORS_RECORD][codec.PACKED_ARRAY]
    content[codec.TENSORS_RECORD] = ArrayRecord(array_dict={codec.PACKED_ARRAY: packed,
                                                            "extra": Array(np.zeros(4, np.uint8))},
                                                keep_input=True)
    _refused(content, RejectReason.MALFORMED, "one Array")

    content = send(odd_adapter())  # the version-1 form: one Array per tensor
    content[codec.TENSORS_RECORD] = ArrayRecord(
        array_dict={name: Array(np.ascontiguousarray(v)) for name, v in odd_adapter().items()}, keep_input=True)
    _refused(content, RejectReason.MALFORMED, "one Array")


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_version_message_is_refused_with_what_to_do(version: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "INLINE_LIMIT", 0)  # laid out as version 2 did: the blob in the one Array
    content = send(odd_adapter())
    header = header_of(content)
    header.protocol_version = version
    monkeypatch.undo()
    _refused(set_header(content, header), RejectReason.PROTOCOL_VERSION, f"protocol {version}", "speaks 3",
             "inline", "same silotune release")


def test_a_tensor_announced_twice_is_refused() -> None:
    content = send(odd_adapter())
    header = header_of(content)
    header.tensors.add().CopyFrom(header.tensors[0])
    _refused(set_header(content, header), RejectReason.TENSOR_NAMES, "announced twice")


def test_a_sender_bug_is_caught_at_packing() -> None:
    spec = codec.pb.TensorSpec(name="t", shape=[2, 2], dtype="float32", encoding=codec.encoding_from_name("fp16"))
    with pytest.raises(ValueError, match="t: fp16 gave float32"):
        codec.pack_tensors([(spec, np.zeros((2, 2), np.float32))])


def test_repacked_changes_only_the_tensor_it_is_given() -> None:
    """The tests' tampering helper (tests/codec_wire.py) lays segments out as the codec does."""
    content = send(odd_adapter(), "q4")
    before = {k: np.array(v) for k, v in wires(content).items()}
    same = repacked(send(odd_adapter(), "q4"), {})
    assert blob_of(same).tobytes() == blob_of(content).tobytes()
    changed = repacked(content, {"m.one": np.full(3, 0x88, np.uint8)})
    after = wires(changed)
    assert all(np.array_equal(after[k], before[k]) for k in before if k != "m.one")
    assert after["m.one"].tolist() == [0x88] * 3


# ---- protocol 3: where the blob travels --------------------------------------------------------

@pytest.fixture()
def task_identity():  # type: ignore[no-untyped-def]
    """Flower's Message needs a run/task identity; set for the test, restored after it."""
    saved = {name: getattr(TaskIdentity, name) for name in ("_task_id", "_run_id", "_node_id")}
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    for name, value in saved.items():
        setattr(TaskIdentity, name, value)


def flower_objects(content: RecordDict) -> int:
    """The objects Flower moves for a Message of ``content`` (one request each at the SuperLink)."""
    message = Message(content, dst_node_id=1, message_type="train")
    return sum(1 for _ in iterate_object_tree(get_object_tree(message)))


def through_flower(content: RecordDict) -> RecordDict:
    """``content`` as the receiver gets it: through Flower's protobuf."""
    return message_from_proto(message_to_proto(Message(content, dst_node_id=1, message_type="train"))).content


def test_a_small_update_travels_inline_in_three_flower_objects(task_identity: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    content = send(odd_adapter())
    assert set(content) == {codec.HEADER_RECORD}
    assert set(content.config_records[codec.HEADER_RECORD]) == {codec.HEADER_KEY, codec.INLINE_KEY}
    assert flower_objects(content) == 3   # Message, RecordDict, the header ConfigRecord
    monkeypatch.setattr(codec, "INLINE_LIMIT", 0)
    arrayed = send(odd_adapter())
    assert set(arrayed) == {codec.HEADER_RECORD, codec.TENSORS_RECORD}
    assert set(arrayed.config_records[codec.HEADER_RECORD]) == {codec.HEADER_KEY}
    assert flower_objects(arrayed) == 6   # ... + ArrayRecord, its Array, the Array's chunk
    assert blob_of(arrayed).tobytes() == blob_of(content).tobytes()


def test_a_blob_above_the_limit_travels_in_the_array_in_flowers_chunks(task_identity: None) -> None:
    big = {"big": np.arange(codec.INLINE_LIMIT // 4 + 1, dtype=np.float32)}   # 4 bytes over the limit
    content = send(big)
    assert set(content) == {codec.HEADER_RECORD, codec.TENSORS_RECORD}
    assert packed_bytes(content) > codec.INLINE_LIMIT
    received = through_flower(content)
    assert np.array_equal(codec.decode(received)[1]["big"], big["big"])
    just = {"big": big["big"][:-1]}   # exactly INLINE_LIMIT bytes: inline
    assert set(send(just)) == {codec.HEADER_RECORD}
    assert np.array_equal(codec.decode(through_flower(send(just)))[1]["big"], just["big"])


@pytest.mark.parametrize("name", ALL)
def test_both_placements_round_trip_bit_exact_through_flower(name: str, task_identity: None,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    values = odd_adapter()
    inline = through_flower(send(values, name))
    monkeypatch.setattr(codec, "INLINE_LIMIT", 0)
    arrayed = through_flower(send(values, name))
    assert codec.TENSORS_RECORD not in inline and codec.TENSORS_RECORD in arrayed
    _, from_array = codec.decode(arrayed)   # under the limit it was sent with
    monkeypatch.undo()
    _, from_inline = codec.decode(inline)
    assert sorted(from_inline) == sorted(from_array) == sorted(values)
    for key in values:
        assert from_inline[key].tobytes() == from_array[key].tobytes()
        if name == "fp32":   # exact, and still read-only views into what was received
            assert from_inline[key].tobytes() == values[key].tobytes() and not from_inline[key].flags.writeable


def test_a_blob_in_both_places_is_refused() -> None:
    content = send(odd_adapter())
    _refused(set_array(content, blob_of(content)), RejectReason.MALFORMED, "both inline", "one placement")


@pytest.mark.parametrize("value", ["text, not bytes", [b"a", b"b"], 7])
def test_inline_tensors_that_are_not_bytes_are_refused(value: object) -> None:
    _refused(set_inline(send(odd_adapter()), value), RejectReason.MALFORMED, "expected bytes")


def test_an_inline_blob_above_the_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    content = send(odd_adapter())
    monkeypatch.setattr(codec, "INLINE_LIMIT", len(blob_of(content)) - 1)
    _refused(content, RejectReason.MALFORMED, "inline blob", "travels in the ArrayRecord")


def test_a_small_blob_in_the_array_is_refused() -> None:
    content = send(odd_adapter())
    blob = blob_of(content)
    set_inline(content, None)
    _refused(set_array(content, blob), RejectReason.MALFORMED, "travels inline")


def test_tensors_announced_without_a_blob_are_refused() -> None:
    _refused(set_inline(send(odd_adapter()), None), RejectReason.MALFORMED, "tensors announced but no blob")


def test_unexpected_keys_in_the_header_record_are_refused() -> None:
    content = send(odd_adapter())
    fields = dict(content.config_records[codec.HEADER_RECORD].items())
    content[codec.HEADER_RECORD] = ConfigRecord({**fields, "tensors": b"\0" * 8})
    _refused(content, RejectReason.MALFORMED, "unexpected key", "'tensors'")
    del content[codec.HEADER_RECORD]
    _refused(content, RejectReason.MALFORMED, "absent")


def test_a_misaligned_buffer_is_copied_not_viewed_misaligned() -> None:
    raw = np.zeros(64 * 3 + 1, np.uint8)
    shifted = raw[1:] if raw.ctypes.data % 16 == 0 else raw[:-1]   # a start off the 16-byte grid
    shifted.flags.writeable = False
    aligned = codec._aligned_blob(shifted)
    assert aligned.ctypes.data % 16 == 0 and not aligned.flags.writeable
    assert aligned.tobytes() == shifted.tobytes()
    fine = codec._aligned_blob(raw[: 64 * 3])
    assert np.shares_memory(fine, raw)


def test_encoded_tensors_in_both_placements_are_a_sender_bug() -> None:
    packed = codec.encode_tensors(odd_adapter())
    assert packed.inline is not None and not packed.arrays
    both = codec.EncodedTensors(packed.specs, {codec.PACKED_ARRAY: Array(np.frombuffer(packed.inline, np.uint8))},
                                packed.inline)
    with pytest.raises(ValueError, match="both inline and in Arrays"):
        send(None, tensors=both)
