"""q8: symmetric 8-bit quantization per block of 64 values, each block with its own float16 scale.

Blocks, scales and rounding are protos/encodings/blockwise.py's, with q in
[-127, 127]; -128 is never sent and is refused on receipt. Unlike int8's one
scale per tensor, a block's scale follows its own values, so a tensor whose
rows differ in size by orders of magnitude (a trained LoRA B) keeps the small
rows' precision: the choice for the global adapter going down.

Wire: one uint8 Array of ``2 * blocks + count`` bytes — first the blocks'
scales (float16, little-endian), then the codes as two's-complement bytes.
TensorSpec.scale is unused. About 1.03 bytes a value: 3.9 times fewer than fp32.

Error bound: each value decodes within scale / 2 of what was sent (scale ≤
max|block| / 127, rounded up to a float16), plus float32 division's under
2**-20 * scale. A block whose scale would exceed 65504 gets an infinite scale,
which the receiver refuses as non-finite, as fp16 does past its range.
"""

from __future__ import annotations

import numpy as np

from protos.encodings import ENCODINGS, UpdateEncoding, blockwise
from protos.errors import RejectReason, UpdateRejected
from protos.silotune.v1 import update_pb2 as pb

#: largest |code|: symmetric, so -128 is left unused
Q_MAX = 127


@ENCODINGS.register("q8")
class Q8(UpdateEncoding):
    wire_id = pb.Q8
    wire_dtype = np.dtype("u1")

    @classmethod
    def wire_shape(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        count = int(np.prod(shape, dtype=np.int64))
        return (2 * blockwise.block_count(count) + count,)

    @classmethod
    def encode(cls, values: np.ndarray) -> tuple[np.ndarray, float]:
        count = int(np.asarray(values).size)
        rows = blockwise.blocks(values)
        scale = blockwise.scales(rows, Q_MAX)
        codes = blockwise.codes(rows, scale, Q_MAX, count)
        return np.concatenate([scale.view(np.uint8), codes.view(np.uint8)]), 0.0

    @classmethod
    def decode(cls, wire: np.ndarray, spec) -> np.ndarray:  # type: ignore[no-untyped-def]
        shape = tuple(spec.shape)
        count = int(np.prod(shape, dtype=np.int64))
        blocks = blockwise.block_count(count)
        # the codec has checked the length against wire_shape(shape): the split below is exact
        scale = blockwise.checked_scales(wire, blocks, spec.name, "q8")
        codes = wire[2 * blocks :].view(np.int8)
        if (codes == -128).any():
            raise UpdateRejected(RejectReason.MALFORMED, f"{spec.name}: q8 code -128, outside [-127, 127]")
        return blockwise.values(codes.astype(np.float32), scale, shape)

    @classmethod
    def max_abs_error(cls, values: np.ndarray) -> float:
        return blockwise.max_abs_error(values, Q_MAX)
