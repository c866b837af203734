"""int8: symmetric per-tensor quantization, value = q * scale, q in [-127, 127].

scale = (largest |value|) / 127, carried in TensorSpec.scale; a tensor of
zeros gets scale 1. A quarter of fp32's bytes.

Error bound: rounding to the nearest step leaves at most scale / 2 per value;
the float32 division and multiplication add under 2**-14 * scale more.
"""

from __future__ import annotations

import numpy as np

from protos.encodings import ENCODINGS, UpdateEncoding
from protos.errors import RejectReason, UpdateRejected
from protos.silotune.v1 import update_pb2 as pb


def _scale(values: np.ndarray) -> float:
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    return peak / 127.0 if peak > 0 else 1.0


@ENCODINGS.register("int8")
class Int8(UpdateEncoding):
    wire_id = pb.INT8
    wire_dtype = np.dtype("i1")

    @classmethod
    def encode(cls, values: np.ndarray) -> tuple[np.ndarray, float]:
        scale = _scale(values)
        return np.clip(np.rint(values / scale), -127, 127).astype("i1"), scale

    @classmethod
    def decode(cls, wire: np.ndarray, spec) -> np.ndarray:  # type: ignore[no-untyped-def]
        # the scale comes from the sender: NaN, Inf, 0 or negative would poison or flip the update
        if not np.isfinite(spec.scale) or spec.scale <= 0:
            raise UpdateRejected(RejectReason.NON_FINITE, f"{spec.name}: int8 scale {spec.scale}")
        return wire.astype(np.float32) * np.float32(spec.scale)

    @classmethod
    def max_abs_error(cls, values: np.ndarray) -> float:
        peak = float(np.max(np.abs(values))) if values.size else 0.0
        if not np.isfinite(peak):
            return float("inf")
        return 0.0 if peak == 0 else _scale(values) * (0.5 + 2.0**-14)
