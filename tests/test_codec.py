"""The update contract: encode/decode round trips and every named rejection."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

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
