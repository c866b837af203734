"""Adding an update encoding is adding one module: the codec and the job config are not edited.

The module below is written to a temporary directory put on the package's
``__path__`` (a module dropped into protos/encodings/ is found the same way),
chosen by name in a run config, and used for a real encode/decode round trip.
It is removed again afterwards, so the other tests see the built-in encodings only.

Its wire id is one the ``silotune.v1.Encoding`` enum does not list: proto3
enums are open, so the id travels in TensorSpec.encoding unchanged (checked
below). A built-in encoding would add its value to update.proto instead
(tests/test_codec.py ties the built-in modules to the enum).
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import protos.encodings
from protos import codec
from protos.adapter import LoraSpec
from protos.encodings import ENCODINGS
from protos.errors import RejectReason, UpdateRejected
from protos.silotune.v1 import update_pb2 as pb
from server.job_config import JobConfig

from codec_wire import repacked, wires

NAME = MODULE = "bf16trunc"
WIRE_ID = 100  # not in the Encoding enum

# the whole of what a contributor writes (besides its test)
SOURCE = '''
"""bf16trunc: bfloat16 (float32's top 16 bits, rounded to nearest even), carried as uint16.

Flower's ArrayRecord refuses bfloat16 arrays, so the bits travel as uint16.
Error bound: a relative error of at most 2**-8 (7 stored mantissa bits), and
2**-133 absolute (half a bfloat16 subnormal step) below float32's normal range.
"""

from __future__ import annotations

import numpy as np

from protos.encodings import ENCODINGS, UpdateEncoding


@ENCODINGS.register("bf16trunc")
class Bf16Trunc(UpdateEncoding):
    wire_id = 100
    wire_dtype = np.dtype("<u2")

    @classmethod
    def encode(cls, values):
        bits = np.ascontiguousarray(values, dtype="<f4").view("<u4").astype(np.uint64)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2"), 0.0

    @classmethod
    def decode(cls, wire, spec):
        return (wire.astype("<u4") << 16).view("<f4")

    @classmethod
    def max_abs_error(cls, values):
        peak = float(np.max(np.abs(values))) if values.size else 0.0
        return peak * 2.0**-8 + 2.0**-133 if peak < 3.3e38 else float("inf")
'''

SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
LAYOUT = {"m.q_proj.lora_A.weight": (4, 16), "m.q_proj.lora_B.weight": (16, 4), "m.v_proj.lora_A.weight": (4, 16)}
UPDATE = codec.Kind.Value("UPDATE")


def adapter() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {name: (rng.normal(size=shape) * 10.0**-i).astype(np.float32)
            for i, (name, shape) in enumerate(LAYOUT.items())}


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[Path]:
    """protos/encodings/ extended by one module in ``tmp_path``; afterwards the registry is as before."""
    before = ENCODINGS.names()
    assert NAME not in before and WIRE_ID not in protos.encodings.by_wire_id()
    (tmp_path / f"{MODULE}.py").write_text(textwrap.dedent(SOURCE))
    importlib.invalidate_caches()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(protos.encodings, "__path__", [*protos.encodings.__path__, str(tmp_path)])
            yield tmp_path
    finally:
        # the path is restored first, so the scan below cannot import the module again
        if NAME in ENCODINGS:
            ENCODINGS.unregister(NAME)
        sys.modules.pop(f"protos.encodings.{MODULE}", None)
        if hasattr(protos.encodings, MODULE):
            delattr(protos.encodings, MODULE)
    assert ENCODINGS.names() == before
    assert WIRE_ID not in protos.encodings.by_wire_id()


def test_an_enum_value_the_proto_does_not_list_survives_the_wire() -> None:
    """The premise of an out-of-tree encoding: proto3 enums are open (protobuf keeps unknown values)."""
    assert WIRE_ID not in pb.Encoding.values()
    header = pb.UpdateHeader(tensors=[pb.TensorSpec(name="t", encoding=WIRE_ID, scale=0.5)])
    parsed = pb.UpdateHeader()
    parsed.ParseFromString(header.SerializeToString())
    assert parsed.tensors[0].encoding == WIRE_ID and parsed.tensors[0].scale == 0.5


def test_a_new_encoding_module_is_selected_by_name_from_a_run_config(plugin: Path) -> None:
    cfg = JobConfig.from_run_config({"update-encoding": NAME})
    assert cfg.update_encoding == NAME
    assert NAME in codec.encoding_names()
    encoding = ENCODINGS.get(NAME)
    assert encoding.name == NAME and encoding.__module__ == f"protos.encodings.{MODULE}"
    assert codec.encoding_from_name(cfg.update_encoding) == WIRE_ID

    original = adapter()
    content = codec.encode(original, kind=UPDATE, job_id="job", server_round=1, fingerprint="fp", lora=SPEC,
                           num_examples=3, encoding=codec.encoding_from_name(cfg.update_encoding))
    header, decoded = codec.decode(content)
    codec.check_header(header, codec.Expectation(kind=UPDATE, job_id="job", server_round=1, fingerprint="fp",
                                                 lora=SPEC, layout=LAYOUT))
    codec.check_values(decoded, norm_bound=1e3)
    assert {t.encoding for t in header.tensors} == {WIRE_ID}  # the id went through the header's bytes

    on_wire = wires(content)
    for name, values in original.items():
        # on the wire: uint16, half of fp32's bytes, each the top half of a float32
        wire = on_wire[name]
        assert wire.dtype == np.dtype("<u2") and wire.shape == values.shape
        assert wire.nbytes == values.nbytes // 2
        # decoded: float32 whose low 16 bits are all zero, which fp32, fp16 and int8 do not give
        out = decoded[name]
        assert out.dtype == np.float32 and out.shape == values.shape
        assert not np.any(out.view("<u4") & 0xFFFF)
        assert np.array_equal(out.view("<u4") >> 16, wire.astype("<u4"))
        # within the encoding's own bound, and lossy (the bound is not vacuous)
        error = float(np.max(np.abs(out - values)))
        assert 0 < error <= encoding.max_abs_error(values)
        assert error <= float(np.max(np.abs(values))) * 2.0**-8


def test_a_new_encoding_checks_like_the_built_in_ones(plugin: Path) -> None:
    """The codec's checks apply to it unchanged: its wire size is enforced, and once it is
    removed its wire id is refused again."""
    wire_id = codec.encoding_from_name(NAME)
    content = codec.encode(adapter(), kind=UPDATE, job_id="job", server_round=1, fingerprint="fp", lora=SPEC,
                           num_examples=3, encoding=wire_id)
    repacked(content, {"m.q_proj.lora_A.weight": np.zeros((4, 16), np.int8)})  # bf16trunc takes 2 bytes a value
    with pytest.raises(UpdateRejected) as info:
        codec.decode(content)
    assert info.value.reason is RejectReason.TENSOR_SHAPE
    assert "bf16trunc" in str(info.value)

    good = codec.encode(adapter(), kind=UPDATE, job_id="job", server_round=1, fingerprint="fp", lora=SPEC,
                        num_examples=3, encoding=wire_id)
    ENCODINGS.unregister(NAME)  # as if the receiver did not know it
    with pytest.raises(UpdateRejected) as info:
        codec.decode(good)
    assert info.value.reason is RejectReason.TENSOR_DTYPE
