"""q4: symmetric 4-bit quantization per block of 64 values, each block with its own float16 scale.

The tensor is flattened (C order) and cut into blocks of ``BLOCK`` values; the
last block may be short. A block's value is ``q * scale`` with q in [-7, 7]:
symmetric, so 0 is exact and a block's sign pattern survives; the 16th code
(-8) is never sent and is refused on receipt. ``scale`` is the smallest float16
at or above ``max|block| / 7`` (rounded up, so no value needs clipping; for a
block of zeros it is 0). Rounding is to nearest, ties to even: deterministic,
the same values give the same bytes everywhere.

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

from protos.encodings import ENCODINGS, UpdateEncoding
from protos.errors import RejectReason, UpdateRejected
from protos.silotune.v1 import update_pb2 as pb

#: values per block, each block one float16 scale
BLOCK = 64
#: largest |code|; q + 8 fills a nibble, so -8 (nibble 0) is left unused
Q_MAX = 7
#: float32 division's share of the error bound, in units of the block's scale
_ROUNDING = 2.0**-20


def _blocks(values: np.ndarray) -> np.ndarray:
    """The flattened values, zero-padded to whole blocks, one block a row."""
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    padded = np.zeros(-(-flat.size // BLOCK) * BLOCK, dtype=np.float32)
    padded[: flat.size] = flat
    return padded.reshape(-1, BLOCK)


def _scales(blocks: np.ndarray) -> np.ndarray:
    """Each block's float16 scale: the smallest float16 ≥ max|block| / 7 (0 for zeros; inf past range)."""
    with np.errstate(over="ignore", invalid="ignore"):
        peak = np.max(np.abs(blocks), axis=1).astype(np.float64) if blocks.size else np.zeros(0)
        scale = (peak / Q_MAX).astype("<f2")
        # float16 * 7 is exact in float64: step up where rounding to nearest went below the peak
        low = scale.astype(np.float64) * Q_MAX < peak
        scale[low] = np.nextafter(scale[low], np.float16(np.inf))
    return scale


@ENCODINGS.register("q4")
class Q4(UpdateEncoding):
    wire_id = pb.Q4
    wire_dtype = np.dtype("u1")

    @classmethod
    def wire_shape(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        count = int(np.prod(shape, dtype=np.int64))
        return (2 * -(-count // BLOCK) + (count + 1) // 2,)

    @classmethod
    def encode(cls, values: np.ndarray) -> tuple[np.ndarray, float]:
        count = int(np.asarray(values).size)
        blocks = _blocks(values)
        scale = _scales(blocks)
        usable = np.isfinite(scale) & (scale > 0)
        # a block of zeros or one past float16's range: codes 0 (the latter is refused by its scale anyway)
        divisor = np.where(usable, scale.astype(np.float32), np.float32(np.inf))[:, None]
        with np.errstate(invalid="ignore"):
            q = np.nan_to_num(np.clip(np.rint(blocks / divisor), -Q_MAX, Q_MAX), nan=0.0)
        nibbles = (q.reshape(-1)[:count].astype(np.int8) + 8).astype(np.uint8)
        if count % 2:
            nibbles = np.append(nibbles, np.uint8(8))  # padding: q = 0
        codes = nibbles[0::2] | (nibbles[1::2] << 4)
        return np.concatenate([scale.view(np.uint8), codes]), 0.0

    @classmethod
    def decode(cls, wire: np.ndarray, spec) -> np.ndarray:  # type: ignore[no-untyped-def]
        shape = tuple(spec.shape)
        count = int(np.prod(shape, dtype=np.int64))
        blocks = -(-count // BLOCK)
        # the codec has checked the length against wire_shape(shape): the split below is exact
        scale = wire[: 2 * blocks].view("<f2")
        # the scales come from the sender: NaN, Inf or a negative one would poison or flip a block
        bad = ~np.isfinite(scale) | np.signbit(scale)
        if bad.any():
            raise UpdateRejected(RejectReason.NON_FINITE,
                                 f"{spec.name}: q4 block {int(np.argmax(bad))} scale {scale[bad][0]}")
        codes = wire[2 * blocks :]
        nibbles = np.empty(2 * codes.size, dtype=np.uint8)
        nibbles[0::2] = codes & 0xF
        nibbles[1::2] = codes >> 4
        if count % 2 and nibbles[-1] != 8:
            raise UpdateRejected(RejectReason.MALFORMED, f"{spec.name}: q4 padding nibble {nibbles[-1]}, not 8")
        nibbles = nibbles[:count]
        if not nibbles.all():
            raise UpdateRejected(RejectReason.MALFORMED, f"{spec.name}: q4 code -8, outside [-7, 7]")
        q = np.zeros(blocks * BLOCK, dtype=np.float32)
        q[:count] = nibbles
        q[:count] -= 8
        out = q.reshape(blocks, BLOCK) * scale.astype(np.float32)[:, None]  # exact: 3-bit × 11-bit mantissas
        return out.reshape(-1)[:count].reshape(shape)

    @classmethod
    def max_abs_error(cls, values: np.ndarray) -> float:
        scale = _scales(_blocks(values))
        if not scale.size:
            return 0.0
        peak = float(np.max(scale.astype(np.float64)))
        if not np.isfinite(peak):
            return float("inf")
        return peak * (0.5 + _ROUNDING)
