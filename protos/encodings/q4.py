"""q4: symmetric 4-bit quantization per block of 64 values, each block with its own float16 scale.

Blocks, scales and rounding are protos/encodings/blockwise.py's, with q in
[-7, 7]; the 16th code (-8) is never sent and is refused on receipt.

Wire: one uint8 Array of ``2 * blocks + ceil(count / 2)`` bytes — first the
blocks' scales (float16, little-endian), then the codes, q + 8 in a nibble,
two a byte (low nibble first); an odd count ends with the padding nibble 8 (q
= 0). TensorSpec.scale is unused. About 0.53 bytes a value: 7.5 times fewer
than fp32 for tensors of a few thousand values and up.

Error bound: each value decodes within scale / 2 of what was sent, its own
block's scale; float32 division adds under 2**-20 * scale. The scale is at
least 2**-24 (float16's smallest step) for a block that is not all zeros, so
values below that lose their relative precision. A block whose scale would
exceed 65504 (values beyond ~458 000) gets an infinite scale, which the
receiver refuses as non-finite, as fp16 does past its range.

The receiver refuses (``UpdateRejected``): a scale that is NaN, infinite or
negative (NON_FINITE, like int8), and a code or padding nibble the encoder
never writes (MALFORMED). Payload length and dtype are the codec's checks,
through ``wire_shape``.
"""

from __future__ import annotations

import numpy as np

from protos.encodings import ENCODINGS, UpdateEncoding, blockwise
from protos.encodings.blockwise import BLOCK
from protos.errors import RejectReason, UpdateRejected
from protos.silotune.v1 import update_pb2 as pb

#: largest |code|; q + 8 fills a nibble, so -8 (nibble 0) is left unused
Q_MAX = 7


@ENCODINGS.register("q4")
class Q4(UpdateEncoding):
    wire_id = pb.Q4
    wire_dtype = np.dtype("u1")

    @classmethod
    def wire_shape(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        count = int(np.prod(shape, dtype=np.int64))
        return (2 * blockwise.block_count(count) + (count + 1) // 2,)

    @classmethod
    def encode(cls, values: np.ndarray) -> tuple[np.ndarray, float]:
        count = int(np.asarray(values).size)
        rows = blockwise.blocks(values)
        scale = blockwise.scales(rows, Q_MAX)
        nibbles = (blockwise.codes(rows, scale, Q_MAX, count) + 8).astype(np.uint8)
        if count % 2:
            nibbles = np.append(nibbles, np.uint8(8))  # padding: q = 0
        packed = nibbles[0::2] | (nibbles[1::2] << 4)
        return np.concatenate([scale.view(np.uint8), packed]), 0.0

    @classmethod
    def decode(cls, wire: np.ndarray, spec) -> np.ndarray:  # type: ignore[no-untyped-def]
        shape = tuple(spec.shape)
        count = int(np.prod(shape, dtype=np.int64))
        blocks = blockwise.block_count(count)
        # the codec has checked the length against wire_shape(shape): the split below is exact
        scale = blockwise.checked_scales(wire, blocks, spec.name, "q4")
        packed = wire[2 * blocks :]
        nibbles = np.empty(2 * packed.size, dtype=np.uint8)
        nibbles[0::2] = packed & 0xF
        nibbles[1::2] = packed >> 4
        if count % 2 and nibbles[-1] != 8:
            raise UpdateRejected(RejectReason.MALFORMED, f"{spec.name}: q4 padding nibble {nibbles[-1]}, not 8")
        nibbles = nibbles[:count]
        if not nibbles.all():
            raise UpdateRejected(RejectReason.MALFORMED, f"{spec.name}: q4 code -8, outside [-7, 7]")
        return blockwise.values(nibbles.astype(np.float32) - 8, scale, shape)

    @classmethod
    def max_abs_error(cls, values: np.ndarray) -> float:
        return blockwise.max_abs_error(values, Q_MAX)
