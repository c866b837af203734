"""fp16: IEEE half precision, little-endian. Half the bytes of fp32.

Error bound: rounding to nearest gives a relative error of at most 2**-11 for
values in fp16's normal range, and an absolute error of at most 2**-25 (half
its smallest subnormal step) below it. Values from 65520 on round to infinity,
which the receiver rejects as non-finite.
"""

from __future__ import annotations

import numpy as np

from protos.encodings import ENCODINGS, UpdateEncoding
from protos.silotune.v1 import update_pb2 as pb

#: the smallest magnitude fp16 rounds to infinity (65504 + half a step)
OVERFLOW = 65520.0


@ENCODINGS.register("fp16")
class Fp16(UpdateEncoding):
    wire_id = pb.FP16
    wire_dtype = np.dtype("<f2")

    @classmethod
    def encode(cls, values: np.ndarray) -> tuple[np.ndarray, float]:
        return values.astype("<f2"), 0.0

    @classmethod
    def decode(cls, wire: np.ndarray, spec) -> np.ndarray:  # type: ignore[no-untyped-def]
        return wire.astype(np.float32)

    @classmethod
    def max_abs_error(cls, values: np.ndarray) -> float:
        peak = float(np.max(np.abs(values))) if values.size else 0.0
        return peak * 2.0**-11 + 2.0**-25 if peak < OVERFLOW else float("inf")
