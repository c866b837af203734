"""The update contract: encode/decode round trips and every named rejection."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord

from protos import codec
from protos.adapter import LoraSpec
from protos.errors import RejectReason, UpdateRejected

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
    wire = content.array_records[codec.TENSORS_RECORD]
    assert wire["m.q_proj.lora_A.weight"].dtype == {"fp16": "float16", "int8": "int8"}[encoding]


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


def test_array_not_matching_its_spec() -> None:
    content = encoded()
    arrays = content.array_records[codec.TENSORS_RECORD]
    arrays["m.q_proj.lora_A.weight"] = Array(np.zeros((4, 16), dtype=np.int8))  # spec says fp32
    assert reason_of(content) is RejectReason.TENSOR_DTYPE
    content = encoded()
    content.array_records[codec.TENSORS_RECORD]["m.q_proj.lora_A.weight"] = Array(np.zeros((2, 16), np.float32))
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
    del content[codec.TENSORS_RECORD]
    assert reason_of(content) is RejectReason.MALFORMED


def test_protocol_version_is_checked() -> None:
    content = encoded()
    header = codec.UpdateHeader()
    header.ParseFromString(content.config_records[codec.HEADER_RECORD]["bytes"])
    header.protocol_version = 99
    content[codec.HEADER_RECORD] = ConfigRecord({"bytes": header.SerializeToString()})
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


def test_a_cached_header_still_checks_each_buffer_and_gives_read_only_views() -> None:
    data = _npy(np.arange(12, dtype="<f4").reshape(3, 4))
    first = codec.wire_view(SimpleNamespace(data=data))
    assert not first.flags.writeable and np.shares_memory(first, np.frombuffer(data, np.uint8))
    with pytest.raises(ValueError):  # same header, one value missing
        codec.wire_view(SimpleNamespace(data=data[:-4]))
    with pytest.raises(ValueError):  # same header, a value too many
        codec.wire_view(SimpleNamespace(data=data + bytes(4)))
    content = encoded()  # through decode: a truncated tensor is MALFORMED, cached header or not
    codec.decode(content)
    arrays = content.array_records[codec.TENSORS_RECORD]
    a = arrays["m.q_proj.lora_A.weight"]
    arrays["m.q_proj.lora_A.weight"] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data[:-4])
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
