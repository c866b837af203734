"""What the blockwise encodings (q4, q8) share: values cut into blocks of 64, one float16 scale each.

The tensor is flattened (C order) and cut into blocks of ``BLOCK`` values; the
last block may be short. A block's value is ``q * scale`` with integer q in
[-q_max, q_max]: symmetric, so 0 is exact and a block's sign pattern survives.
``scale`` is the smallest float16 at or above ``max|block| / q_max`` (rounded
up, so no value needs clipping; 0 for a block of zeros). Rounding is to
nearest, ties to even: the same values give the same bytes everywhere.

Each value decodes within ``scale / 2`` of what was sent, its own block's
scale; float32 division adds under 2**-20 * scale. A block whose scale would
exceed 65504 gets an infinite scale, which the receiver refuses as non-finite.
"""

from __future__ import annotations

import numpy as np

from protos.errors import RejectReason, UpdateRejected

#: values per block, each block one float16 scale
BLOCK = 64
#: float32 division's share of the error bound, in units of the block's scale
_ROUNDING = 2.0**-20


def block_count(count: int) -> int:
    return -(-count // BLOCK)


def blocks(values: np.ndarray) -> np.ndarray:
    """The flattened values, zero-padded to whole blocks, one block a row."""
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    padded = np.zeros(block_count(flat.size) * BLOCK, dtype=np.float32)
    padded[: flat.size] = flat
    return padded.reshape(-1, BLOCK)


def scales(rows: np.ndarray, q_max: int) -> np.ndarray:
    """Each block's float16 scale: the smallest float16 ≥ max|block| / q_max (0 for zeros; inf past range)."""
    with np.errstate(over="ignore", invalid="ignore"):
        peak = np.max(np.abs(rows), axis=1).astype(np.float64) if rows.size else np.zeros(0)
        scale = (peak / q_max).astype("<f2")
        # a float16 times q_max is exact in float64: step up where rounding to nearest went below the peak
        low = scale.astype(np.float64) * q_max < peak
        scale[low] = np.nextafter(scale[low], np.float16(np.inf))
    return scale


def codes(rows: np.ndarray, scale: np.ndarray, q_max: int, count: int) -> np.ndarray:
    """The first ``count`` values' integer codes in [-q_max, q_max], as int8."""
    usable = np.isfinite(scale) & (scale > 0)
    # a block of zeros or one past float16's range: codes 0 (the latter is refused by its scale anyway)
    divisor = np.where(usable, scale.astype(np.float32), np.float32(np.inf))[:, None]
    with np.errstate(invalid="ignore"):
        q = np.nan_to_num(np.clip(np.rint(rows / divisor), -q_max, q_max), nan=0.0)
    return q.reshape(-1)[:count].astype(np.int8)


def checked_scales(wire: np.ndarray, blocks_: int, name: str, encoding: str) -> np.ndarray:
    """The sender's block scales, the first ``2 * blocks_`` bytes; NaN, Inf or a negative
    one would poison or flip a block: UpdateRejected NON_FINITE."""
    scale = wire[: 2 * blocks_].view("<f2")
    bad = ~np.isfinite(scale) | np.signbit(scale)
    if bad.any():
        raise UpdateRejected(RejectReason.NON_FINITE,
                             f"{name}: {encoding} block {int(np.argmax(bad))} scale {scale[bad][0]}")
    return scale


def values(q: np.ndarray, scale: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values of codes ``q`` (float32, one per value) under the block scales, in ``shape``."""
    count = q.size
    padded = np.zeros(scale.size * BLOCK, dtype=np.float32)
    padded[:count] = q
    # exact: an 8-bit code times an 11-bit float16 mantissa fits float32's 24 bits
    out = padded.reshape(-1, BLOCK) * scale.astype(np.float32)[:, None]
    return out.reshape(-1)[:count].reshape(shape)


def max_abs_error(values_: np.ndarray, q_max: int) -> float:
    scale = scales(blocks(values_), q_max)
    if not scale.size:
        return 0.0
    peak = float(np.max(scale.astype(np.float64)))
    if not np.isfinite(peak):
        return float("inf")
    return peak * (0.5 + _ROUNDING)
