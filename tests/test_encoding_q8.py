"""q8 (protos/encodings/q8.py): 8-bit codes per block of 64 values, each block with a float16 scale.

The claims (the error bound itself is tests/test_codec.py's, for every encoding):
a LoRA tensor takes 3.9 times fewer bytes than fp32; a trained B, whose rows
differ by orders of magnitude, keeps its small rows far better than int8's one
scale per tensor; a code or a scale the encoder never writes is refused by name.
"""

from __future__ import annotations

import numpy as np
import pytest

from protos import codec
from protos.adapter import LoraSpec
from protos.encodings import ENCODINGS
from protos.errors import RejectReason, UpdateRejected
from protos.silotune.v1 import update_pb2 as pb

from codec_wire import repacked, wires

Q8 = ENCODINGS.get("q8")


def _content(values: dict[str, np.ndarray], encoding: int):  # type: ignore[no-untyped-def]
    return codec.encode(values, kind=codec.Kind.Value("UPDATE"), job_id="job", server_round=1, fingerprint="fp",
                        lora=LoraSpec(), num_examples=5, encoding=encoding)


def _lora_b(rng: np.random.Generator) -> np.ndarray:
    """A rank-8 B whose magnitude differs by orders from one group of 8 output rows to the next
    (a block of 64 values is 8 rows of 8)."""
    groups = np.repeat(10.0 ** rng.uniform(-5, -1, (576 // 8, 1)), 8, axis=0)
    return (rng.standard_normal((576, 8)) * groups).astype(np.float32)


def test_q8_takes_3_9_times_fewer_bytes_than_fp32() -> None:
    values = np.ones((576, 8), np.float32)
    wire, scale = Q8.encode(values)
    assert scale == 0.0 and wire.dtype == np.uint8
    assert wire.nbytes == 2 * 576 * 8 // 64 + 576 * 8
    assert values.nbytes / wire.nbytes > 3.87


def test_q8_keeps_the_small_rows_of_a_trained_b_that_int8_loses() -> None:
    b = _lora_b(np.random.default_rng(3))
    small = np.abs(b).max(axis=1) < 1e-4
    decoded = {name: codec.decode(_content({"b": b}, wire_id))[1]["b"] for name, wire_id in
               (("q8", pb.Q8), ("int8", pb.INT8))}
    relative = {name: np.abs(value[small] - b[small]).max() / np.abs(b[small]).max()
                for name, value in decoded.items()}
    assert relative["q8"] < 0.01 < relative["int8"], relative


def _tampered(position: int, byte: int):  # type: ignore[no-untyped-def]
    content = _content({"t": np.linspace(-1, 1, 100, dtype=np.float32).reshape(10, 10)}, pb.Q8)
    wire = np.array(wires(content)["t"])
    wire[position] = byte
    return repacked(content, {"t": wire})


@pytest.mark.parametrize(("position", "byte", "reason", "says"), [
    (2 * 2 + 5, 0x80, RejectReason.MALFORMED, "q8 code -128"),        # a code byte of -128
    (1, 0x7E, RejectReason.NON_FINITE, "q8 block 0 scale nan"),       # block 0's scale: 0x7E00 is NaN
    (3, 0xFC, RejectReason.NON_FINITE, "q8 block 1 scale"),           # block 1's scale: 0xFC.. is -inf or NaN
])
def test_a_code_or_scale_the_encoder_never_writes_is_refused(position: int, byte: int, reason: RejectReason,
                                                             says: str) -> None:
    with pytest.raises(UpdateRejected) as refused:
        codec.decode(_tampered(position, byte))
    assert refused.value.reason is reason and says in str(refused.value)
