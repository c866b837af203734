"""fp32: float32, little-endian, as is. Lossless; decode is a read-only view over the received bytes."""

from __future__ import annotations

import numpy as np

from protos.encodings import ENCODINGS, UpdateEncoding
from protos.silotune.v1 import update_pb2 as pb


@ENCODINGS.register("fp32")
class Fp32(UpdateEncoding):
    wire_id = pb.FP32
    wire_dtype = np.dtype("<f4")

    @classmethod
    def encode(cls, values: np.ndarray) -> tuple[np.ndarray, float]:
        return np.ascontiguousarray(values, dtype="<f4"), 0.0

    @classmethod
    def decode(cls, wire: np.ndarray, spec) -> np.ndarray:  # type: ignore[no-untyped-def]
        # no copy: the coordinator decodes every reply once, and this view is all it needs
        return wire

    @classmethod
    def max_abs_error(cls, values: np.ndarray) -> float:
        return 0.0
