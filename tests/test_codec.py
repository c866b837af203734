"""The update contract: encode/decode round trips and every named rejection."""

from __future__ import annotations

import contextlib
import filecmp
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord

from protos import codec, encodings
from protos.adapter import LoraSpec
from protos.encodings import ENCODINGS, UpdateEncoding
from protos.errors import RejectReason, UpdateRejected

from codec_wire import blob_of, header_of, repacked, set_header, set_inline, wires

ROOT = Path(__file__).resolve().parent.parent
SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
LAYOUT = {"m.q_proj.lora_A.weight": (4, 16), "m.q_proj.lora_B.weight": (16, 4)}
UPDATE = codec.Kind.Value("UPDATE")


def adapter(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in LAYOUT.items()}


def encoded(values=None, **overrides):  # type: ignore[no-untyped-def]
    kwargs = dict(kind=UPDATE, job_id="job", server_round=3, fingerprint="fp", lora=SPEC,
                  num_examples=10, metrics={"train_loss": 1.5})
    kwargs.update(overrides)
    return codec.encode(adapter() if values is None else values, **kwargs)


EXPECT = codec.Expectation(kind=UPDATE, job_id="job", server_round=3, fingerprint="fp", lora=SPEC, layout=LAYOUT)


def reason_of(content, expectation=EXPECT):  # type: ignore[no-untyped-def]
    with pytest.raises(UpdateRejected) as info:
        header, values = codec.decode(content)
        codec.check_header(header, expectation)
        codec.check_values(values, norm_bound=1e3)
    return info.value.reason


def test_fp32_round_trip_is_exact() -> None:
    header, values = codec.decode(encoded())
    codec.check_header(header, EXPECT)
    assert header.num_examples == 10 and header.metrics["train_loss"] == 1.5
    for name, original in adapter().items():
        assert values[name].dtype == np.float32
        assert np.array_equal(values[name], original)


@pytest.mark.parametrize("encoding,tolerance", [("fp16", 2e-3), ("int8", 1.5e-2)])
def test_compressed_encodings_within_tolerance(encoding: str, tolerance: float) -> None:
    content = encoded(encoding=codec.encoding_from_name(encoding))
    _, values = codec.decode(content)
    for name, original in adapter().items():
        relative = np.abs(values[name] - original).max() / np.abs(original).max()
        assert relative < tolerance
    assert wires(content)["m.q_proj.lora_A.weight"].dtype == {"fp16": "float16", "int8": "int8"}[encoding]


# ---- encodings: one module each (protos/encodings/), the codec dispatches ------------------


def _golden_adapter() -> dict[str, np.ndarray]:
    """Values with exact float32 arithmetic (no RNG, no libm) and the edge cases of each
    encoding: fp16 and int8 rounding ties, fp16 subnormals and its largest value, -0.0,
    an empty tensor and a tensor of zeros (int8 scale 1)."""
    ramp = (np.arange(64, dtype=np.float32) - np.float32(31.5)) / np.float32(7.0)
    ties = np.array([0.5, 1.5, -2.5, 1 + 2**-11, 1 + 3 * 2**-11, 2**-25, -0.0, 6e-8, 65504.0, 1e-30, 127.5,
                     -126.5, 3.0, -3.0, 0.25, 1.0], np.float32)
    return {"m.q_proj.lora_A.weight": ramp.reshape(4, 16),
            "m.q_proj.lora_B.weight": np.tile(ties, 4).reshape(16, 4) * np.float32(0.01),
            "m.v_proj.lora_A.weight": ties.reshape(4, 4), "m.z.empty": np.zeros((0, 3), np.float32),
            "m.z.zero": np.zeros((2, 2), np.float32)}


#: sha256 (first 32 hex digits) of the header bytes, each tensor's wire values (dtype, shape, values)
#: and each decoded tensor, as the codec produced them before the encodings moved to
#: protos/encodings/ (fp32, fp16, int8) and in protocol version 1, one Array per tensor (q4, q8)
GOLDEN = {"fp32": "d0776b18c4c461773327a7f6979a2460", "fp16": "5544111d15e72c34c724edcef4f107e1",
          "int8": "13fe240f4b59e3722a018bf47810db80", "q4": "dea613218d946e2a602fe6e0e9aca18a",
          "q8": "3b31615a965a62aa4c6742901b29a9ed"}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_built_in_encodings_put_the_same_bytes_on_the_wire_as_before(name: str) -> None:
    """Each tensor's bytes and values are those of version 1; packing changed only where they sit
    (the header's version and segments, which are set back to version 1's here)."""
    content = encoded(_golden_adapter(), encoding=codec.encoding_from_name(name))
    header = header_of(content)
    header.protocol_version = 1
    for spec in header.tensors:
        spec.ClearField("offset")
        spec.ClearField("nbytes")
    digest = hashlib.sha256(header.SerializeToString())
    for key, wire in sorted(wires(content).items()):
        digest.update(key.encode() + wire.dtype.str.encode() + repr(wire.shape).encode() + wire.tobytes())
    _, decoded = codec.decode(content)
    for key in sorted(decoded):
        digest.update(decoded[key].dtype.str.encode() + decoded[key].tobytes())
    assert digest.hexdigest()[:32] == GOLDEN[name]


def test_the_proto_enum_and_the_encoding_modules_correspond_one_to_one() -> None:
    """update.proto's Encoding enum is the wire truth: every value but ENCODING_UNSPECIFIED has
    a module of that name registering that wire id, and there is no other built-in encoding."""
    unspecified = codec.Encoding.Value("ENCODING_UNSPECIFIED")
    enum = {name.lower(): value for name, value in codec.Encoding.items() if value != unspecified}
    registered = {name: encoding.wire_id for name, encoding in ENCODINGS.items()}
    assert registered == enum
    assert len(set(registered.values())) == len(registered)
    for name, encoding in ENCODINGS.items():
        assert encoding.name == name and encoding.__module__ == f"protos.encodings.{name}"
        assert codec.encoding_from_name(name.upper()) == codec.Encoding.Value(name.upper())
    assert dict(encodings.by_wire_id()) == {value: ENCODINGS.get(name) for name, value in enum.items()}
    assert codec.encoding_names() == sorted(enum, key=enum.__getitem__)  # wire-id order: fp32, fp16, int8


def _tensors_for_the_bounds() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    out = [rng.normal(size=(33, 7)).astype(np.float32) * np.float32(s) for s in (1e-6, 1e-3, 1.0, 300.0)]
    out.append(_golden_adapter()["m.v_proj.lora_A.weight"])
    out.append(np.array([1e-40, -3e-39, 2e-7, 0.0, -0.0, 6e-5], np.float32))  # float32 and fp16 subnormals
    out.append(np.full((5,), 7.25, np.float32))
    out.append(np.zeros((3, 3), np.float32))
    out.append(np.zeros((0, 4), np.float32))
    return out


@pytest.mark.parametrize("name", ["fp32", "fp16", "int8", "q4", "q8"])
def test_each_encoding_keeps_within_its_documented_error_bound(name: str) -> None:
    encoding = ENCODINGS.get(name)
    tensors = _tensors_for_the_bounds()
    values = {f"t{i}": v for i, v in enumerate(tensors)}
    content = encoded(values, encoding=encoding.wire_id)
    _, decoded = codec.decode(content)
    for key, original in values.items():
        bound = encoding.max_abs_error(original)
        assert np.isfinite(bound) and bound >= 0
        error = float(np.max(np.abs(decoded[key] - original))) if original.size else 0.0
        assert error <= bound, (key, error, bound)
    assert all(encoding.max_abs_error(v) == 0.0 for v in tensors) == (name == "fp32")  # fp32 only is exact
    if name == "fp16":  # beyond 65504 fp16 holds infinity: no finite bound
        assert encoding.max_abs_error(np.array([7e4], np.float32)) == np.inf


@pytest.mark.parametrize("placement", ["inline", "array"])
def test_fp32_decodes_to_a_read_only_view_over_the_received_bytes(placement: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    if placement == "array":
        monkeypatch.setattr(codec, "INLINE_LIMIT", 0)  # this small adapter's blob goes in the Array
    content = encoded()
    _, values = codec.decode(content)
    if placement == "inline":
        assert codec.TENSORS_RECORD not in content
        received = content.config_records[codec.HEADER_RECORD][codec.INLINE_KEY]
    else:
        (array,) = content.array_records[codec.TENSORS_RECORD].values()
        received = array.data
    for name in LAYOUT:
        assert not values[name].flags.writeable
        assert np.shares_memory(values[name], np.frombuffer(received, np.uint8))


def test_encoding_names_and_wire_ids() -> None:
    with pytest.raises(ValueError, match=r"unknown encoding 'int4'; valid: .*'fp16'.*'fp32'.*'int8'"):
        codec.encoding_from_name("int4")
    with pytest.raises(ValueError, match="unsupported encoding 42"):
        encoded(encoding=42)
    with pytest.raises(ValueError, match="unsupported encoding 0"):  # ENCODING_UNSPECIFIED
        encoded(encoding=0)
    for unknown in (0, 42):  # a tensor announced in an encoding no module provides
        content = encoded()
        header = codec.UpdateHeader()
        header.ParseFromString(content.config_records[codec.HEADER_RECORD]["bytes"])
        header.tensors[1].encoding = unknown
        set_header(content, header)
        assert reason_of(content) is RejectReason.TENSOR_DTYPE


@contextlib.contextmanager
def _registered(name: str, encoding: type[UpdateEncoding]):  # type: ignore[no-untyped-def]
    ENCODINGS.register(name)(encoding)
    try:
        yield encoding
    finally:
        ENCODINGS.unregister(name)
        assert codec.encoding_names() == ["fp32", "fp16", "int8", "q4", "q8"]


def _encoding_class(wire_id: object, wire_dtype: object = np.dtype("<f4")) -> type[UpdateEncoding]:
    fp32 = ENCODINGS.get("fp32")

    class Probe(UpdateEncoding):
        encode = fp32.encode
        decode = fp32.decode
        max_abs_error = fp32.max_abs_error

    Probe.wire_id = wire_id  # type: ignore[assignment]
    Probe.wire_dtype = wire_dtype  # type: ignore[assignment]
    return Probe


def test_two_encodings_on_one_wire_id_are_refused_with_both_named() -> None:
    with _registered("fp32-again", _encoding_class(codec.Encoding.Value("FP32"))):
        for use in (encodings.by_wire_id, codec.encoding_names, lambda: codec.encoding_from_name("fp16"),
                    lambda: codec.decode(encoded())):
            with pytest.raises(ValueError, match=r"'fp32'.*'fp32-again'.*share wire id 1"):
                use()
    codec.decode(encoded())  # removed again: all is well


@pytest.mark.parametrize("wire_id,wire_dtype,message", [
    (0, np.dtype("<f4"), "wire id 0 is not in"),      # ENCODING_UNSPECIFIED: what an unset field reads as
    (2**31, np.dtype("<f4"), "is not in 1..2147483647"),  # TensorSpec.encoding is an int32
    ("7", np.dtype("<f4"), "wire id '7'"),
    (77, "<f4", "wire_dtype must be a numpy dtype"),
])
def test_an_encoding_with_an_unusable_wire_id_or_dtype_is_refused(  # type: ignore[no-untyped-def]
        wire_id, wire_dtype, message) -> None:
    with _registered("probe", _encoding_class(wire_id, wire_dtype)):
        with pytest.raises(ValueError, match=message):
            codec.encoding_names()


class _Int4Packed(UpdateEncoding):
    """Two 4-bit values a byte, value = q * scale with q in [-7, 7]: a wire shape other than the tensor's."""

    wire_id = 90
    wire_dtype = np.dtype("u1")

    @classmethod
    def wire_shape(cls, shape):  # type: ignore[no-untyped-def]
        return ((int(np.prod(shape, dtype=np.int64)) + 1) // 2,)

    @classmethod
    def encode(cls, values):  # type: ignore[no-untyped-def]
        peak = float(np.max(np.abs(values))) if values.size else 0.0
        scale = peak / 7.0 if peak > 0 else 1.0
        q = (np.clip(np.rint(values.reshape(-1) / scale), -7, 7).astype(np.int8) + 8).astype(np.uint8)
        q = np.append(q, np.uint8(8)) if q.size % 2 else q
        return q[0::2] | (q[1::2] << 4), scale

    @classmethod
    def decode(cls, wire, spec):  # type: ignore[no-untyped-def]
        q = np.stack([wire & 0xF, wire >> 4], axis=1).reshape(-1).astype(np.float32) - 8
        count = int(np.prod(tuple(spec.shape), dtype=np.int64))
        return (q[:count] * np.float32(spec.scale)).reshape(tuple(spec.shape))

    @classmethod
    def max_abs_error(cls, values):  # type: ignore[no-untyped-def]
        peak = float(np.max(np.abs(values))) if values.size else 0.0
        return peak / 7.0 * (0.5 + 2.0**-14)


def test_an_encoding_may_pack_values_into_another_wire_shape() -> None:
    """A 4-bit encoding is one class: the codec checks the packed shape it declares."""
    with _registered("int4-packed", _Int4Packed):
        values = {"a": np.linspace(-1, 1, 15, dtype=np.float32).reshape(3, 5), "b": np.zeros((0, 2), np.float32)}
        content = encoded(values, encoding=_Int4Packed.wire_id)
        assert wires(content)["a"].shape == (8,) and wires(content)["a"].dtype == np.uint8
        header, decoded = codec.decode(content)
        assert [tuple(t.shape) for t in header.tensors] == [(3, 5), (0, 2)]  # the logical shapes
        assert decoded["a"].shape == (3, 5) and decoded["b"].shape == (0, 2)
        assert np.max(np.abs(decoded["a"] - values["a"])) <= _Int4Packed.max_abs_error(values["a"])
        repacked(content, {"a": np.zeros(15, np.uint8)})  # unpacked: the tensor's count, not the packed one
        assert reason_of(content) is RejectReason.TENSOR_SHAPE


def test_an_encoding_missing_part_of_the_interface_cannot_register() -> None:
    class NoDecode(UpdateEncoding):
        wire_id = 77
        wire_dtype = np.dtype("<f4")

        @classmethod
        def encode(cls, values):  # type: ignore[no-untyped-def]
            return values, 0.0

        @classmethod
        def max_abs_error(cls, values):  # type: ignore[no-untyped-def]
            return 0.0

    with pytest.raises(TypeError, match="abstract"):
        ENCODINGS.register("no-decode")(NoDecode)
    assert "no-decode" not in ENCODINGS


@pytest.mark.parametrize(
    "overrides,reason",
    [
        ({"job_id": "other"}, RejectReason.WRONG_JOB),
        ({"server_round": 2}, RejectReason.WRONG_ROUND),
        ({"fingerprint": "another-base"}, RejectReason.BASE_MODEL_MISMATCH),
        ({"lora": LoraSpec(rank=4, alpha=16.0, target_modules=("q_proj", "v_proj"))}, RejectReason.ADAPTER_CONFIG_MISMATCH),
        ({"kind": codec.Kind.Value("GLOBAL")}, RejectReason.WRONG_KIND),
        ({"num_examples": 0}, RejectReason.NUM_EXAMPLES),
    ],
)
def test_header_mismatches_are_named(overrides, reason) -> None:  # type: ignore[no-untyped-def]
    assert reason_of(encoded(**overrides)) is reason


def test_missing_and_extra_tensors() -> None:
    values = adapter()
    del values["m.q_proj.lora_B.weight"]
    assert reason_of(encoded(values)) is RejectReason.TENSOR_NAMES
    values = adapter()
    values["m.k_proj.lora_A.weight"] = np.zeros((4, 16), np.float32)
    assert reason_of(encoded(values)) is RejectReason.TENSOR_NAMES


def test_wrong_shape() -> None:
    values = adapter()
    values["m.q_proj.lora_A.weight"] = np.zeros((4, 17), np.float32)
    assert reason_of(encoded(values)) is RejectReason.TENSOR_SHAPE


def test_segment_not_matching_its_spec() -> None:
    content = repacked(encoded(), {"m.q_proj.lora_A.weight": np.zeros((4, 16), dtype=np.int8)})  # fp32's size: 256
    assert reason_of(content) is RejectReason.TENSOR_SHAPE
    content = repacked(encoded(), {"m.q_proj.lora_A.weight": np.zeros((2, 16), np.float32)})
    assert reason_of(content) is RejectReason.TENSOR_SHAPE


def test_non_finite_and_norm_bound() -> None:
    values = adapter()
    values["m.q_proj.lora_B.weight"][0, 0] = np.nan
    assert reason_of(encoded(values)) is RejectReason.NON_FINITE
    values = adapter()
    values["m.q_proj.lora_B.weight"] *= 1e6
    assert reason_of(encoded(values)) is RejectReason.NORM_BOUND


def test_malformed_records() -> None:
    content = encoded()
    content[codec.HEADER_RECORD] = ConfigRecord({"bytes": b"\xff\x00not a protobuf"})
    assert reason_of(content) is RejectReason.MALFORMED
    content = encoded()
    assert blob_of(content).size
    set_inline(content, None)  # the tensors announced, their bytes not sent
    assert reason_of(content) is RejectReason.MALFORMED


def test_protocol_version_is_checked() -> None:
    content = encoded()
    header = header_of(content)
    header.protocol_version = 99
    set_header(content, header)
    assert reason_of(content) is RejectReason.PROTOCOL_VERSION


def test_norm_is_measured_from_the_reference() -> None:
    values = adapter()
    assert codec.check_values(values, reference=values) == 0.0
    moved = {k: v + 1.0 for k, v in values.items()}
    expected = np.sqrt(sum(v.size for v in values.values()))
    assert codec.check_values(moved, reference=values) == pytest.approx(expected)


def test_a_nan_reference_never_lets_an_update_through_the_bound() -> None:
    values = adapter()
    broken = {k: np.full_like(v, np.nan) for k, v in values.items()}
    with pytest.raises(codec.UpdateRejected) as caught:
        codec.check_values(values, reference=broken, norm_bound=1e9)
    assert caught.value.reason == RejectReason.NORM_BOUND


def test_generated_protobuf_code_is_current(tmp_path: Path) -> None:
    """The committed update_pb2.py must be what protoc makes of update.proto (`make protos`)."""
    shutil.copytree(ROOT / "protos" / "silotune", tmp_path / "silotune",
                    ignore=shutil.ignore_patterns("*_pb2.py*", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", str(tmp_path / "silotune" / "v1" / "update.proto")],
        check=True,
    )
    for name in ("update_pb2.py", "update_pb2.pyi"):
        assert filecmp.cmp(tmp_path / "silotune" / "v1" / name, ROOT / "protos" / "silotune" / "v1" / name,
                           shallow=False), f"{name} is stale: run `make protos`"


# ---- the .npy header cache of wire_view --------------------------------------------------


def _wire_view_uncached(data: bytes) -> np.ndarray:
    """wire_view as it was before headers were cached: numpy's parser every time."""
    shape, dtype, count, offset = codec._parse_npy_header(data)
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError("byte count")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def _outcome(view, data: bytes):  # type: ignore[no-untyped-def]
    try:
        out = view(data)
    except Exception:
        return "rejected"
    return (out.dtype.str, out.shape, out.tobytes(), out.flags.writeable)


def _npy(values: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    import io

    from numpy.lib import format as npy_format

    buffer = io.BytesIO()
    npy_format.write_array(buffer, values, version=version, allow_pickle=False)
    return buffer.getvalue()


def test_cached_headers_accept_and_reject_exactly_as_numpy_does() -> None:
    """Random corruptions of valid buffers, each viewed twice (cold, then cached):
    the same arrays or the same refusals as the uncached parser."""
    codec._header_cache.clear()
    rng = np.random.default_rng(7)
    sources = [_npy(np.arange(12, dtype="<f4").reshape(3, 4)), _npy(np.arange(6, dtype="<f2")),
               _npy(np.arange(8, dtype="i1").reshape(2, 2, 2), version=(2, 0)), _npy(np.float32(2.5).reshape(())),
               _npy(np.zeros((0, 4), "<f4")), _npy(np.arange(4, dtype=">f4")), _npy(np.arange(4, dtype="<u4"))]
    cases = list(sources)
    for source in sources:
        for _ in range(150):
            data = bytearray(source)
            how = rng.integers(4)
            if how == 0:  # flip bytes anywhere in the header or the length field
                for _ in range(rng.integers(1, 4)):
                    data[rng.integers(0, min(len(data), 140))] = rng.integers(256)
            elif how == 1:  # truncate or extend
                cut = int(rng.integers(0, len(data) + 1))
                data = data[:cut] if rng.integers(2) else data + bytes(int(rng.integers(1, 9)))
            elif how == 2:  # rewrite a header field
                text = bytes(data).replace(b"(3, 4)", b"(4, 4)").replace(b"False", b"True ")
                data = bytearray(text.replace(b"'<f4'", b"'|O' ") if rng.integers(2) else text)
            else:  # another version byte
                data[6] = int(rng.integers(0, 4))
            cases.append(bytes(data))
    accepted = 0
    for data in cases:
        expected = _outcome(_wire_view_uncached, data)
        accepted += expected != "rejected"
        for _ in range(2):
            assert _outcome(lambda d: codec.wire_view(SimpleNamespace(data=d)),
                            data) == expected, data[:140]
    assert 10 < accepted < len(cases) - 100  # both sides of the check were exercised
    assert len(codec._header_cache) <= codec._HEADER_CACHE_MAX_ENTRIES


def test_a_cached_header_still_checks_each_buffer_and_gives_read_only_views(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _npy(np.arange(12, dtype="<f4").reshape(3, 4))
    first = codec.wire_view(SimpleNamespace(data=data))
    assert not first.flags.writeable and np.shares_memory(first, np.frombuffer(data, np.uint8))
    with pytest.raises(ValueError):  # same header, one value missing
        codec.wire_view(SimpleNamespace(data=data[:-4]))
    with pytest.raises(ValueError):  # same header, a value too many
        codec.wire_view(SimpleNamespace(data=data + bytes(4)))
    monkeypatch.setattr(codec, "INLINE_LIMIT", 0)  # the blob in the Array, whose .npy header is cached
    content = encoded()  # through decode: a truncated Array is MALFORMED, cached header or not
    codec.decode(content)
    arrays = content.array_records[codec.TENSORS_RECORD]
    a = arrays[codec.PACKED_ARRAY]
    arrays[codec.PACKED_ARRAY] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data[:-4])
    assert reason_of(content) is RejectReason.MALFORMED


def test_the_header_cache_is_bounded() -> None:
    codec._header_cache.clear()
    for n in range(codec._HEADER_CACHE_MAX_ENTRIES + 50):
        codec.wire_view(Array(np.zeros(n % 3000 + 1, np.float32)))
    assert len(codec._header_cache) == codec._HEADER_CACHE_MAX_ENTRIES
    big = b"\x93NUMPY\x01\x00" + (2000).to_bytes(2, "little") + (
        b"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }".ljust(1999) + b"\n") + bytes(12)
    before = dict(codec._header_cache)
    assert codec.wire_view(SimpleNamespace(data=big)).shape == (3,)
    assert codec._header_cache == before  # long headers are parsed, not kept


# ---- check_values: chunked, deterministic, no BLAS -----------------------------------------


def test_check_values_matches_an_exact_norm_and_repeats_bit_for_bit(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import math

    def no_blas(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("check_values must not go through BLAS")

    monkeypatch.setattr(np, "dot", no_blas)
    monkeypatch.setattr(np, "vdot", no_blas)
    rng = np.random.default_rng(3)
    values = {"a": rng.normal(size=(3 * codec.CHECK_CHUNK + 17,)).astype(np.float32),
              "b": rng.normal(size=(64, 33)).astype(np.float32), "c": np.zeros((0, 5), np.float32)}
    reference = {k: (0.5 * v).astype(np.float32) for k, v in values.items()}
    norm = codec.check_values(values, reference=reference)
    delta = [float(x) for k, v in values.items() for x in (v - reference[k]).ravel()]
    exact = math.sqrt(math.fsum(x * x for x in delta))
    assert norm == pytest.approx(exact, rel=1e-13)
    assert all(codec.check_values(values, reference=reference) == norm for _ in range(3))
    alone = math.sqrt(math.fsum(float(x) ** 2 for v in values.values() for x in v.ravel()))
    assert codec.check_values(values) == pytest.approx(alone, rel=1e-13)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_values_finds_a_non_finite_value_in_any_slice(bad: float) -> None:
    values = {"a": np.ones(2 * codec.CHECK_CHUNK + 5, np.float32)}
    for position in (0, codec.CHECK_CHUNK + 1, 2 * codec.CHECK_CHUNK + 4):
        broken = {"a": values["a"].copy()}
        broken["a"][position] = bad
        for reference in (None, {"a": np.zeros_like(values["a"])}):
            with pytest.raises(UpdateRejected) as info:
                codec.check_values(broken, reference=reference)
            assert info.value.reason is RejectReason.NON_FINITE


def test_check_values_an_overflowing_difference_is_over_any_bound() -> None:
    values, reference = {"a": np.array([3e38, 1], np.float32)}, {"a": np.array([-3e38, 1], np.float32)}
    with np.errstate(over="ignore"):
        assert codec.check_values(values, reference=reference) == np.inf
        with pytest.raises(UpdateRejected) as info:
            codec.check_values(values, reference=reference, norm_bound=1e30)
    assert info.value.reason is RejectReason.NORM_BOUND
