"""The sum of squares behind ``codec.check_values``'s norm, compiled (numba).

One slice of an update is summed in one pass: each value (or its float32
difference from the reference) is cast to float64 — exact — squared — exact, a
float32 squared fits a float64 — and added into one of ``LANES`` running sums,
value i into lane i mod LANES, the tail past the last full group of LANES into
lane 0; then the lanes are added as a fixed tree, ((0+1)+(2+3))+((4+5)+(6+7)).
Every operation is a plain IEEE float64 add or multiply in an order the code
fixes (numba compiles without fast-math, so LLVM may neither reorder the adds
nor fuse a multiply into an add), so a slice's sum has the same bits on every
machine, vector width and thread count. The lanes are what lets the compiler
keep eight independent adds in flight.

Why compiled: numpy needs four passes over a slice (subtract, cast, square,
reduce), which made the norm compute-bound at twice the time it takes to read
the update and the reference once; this is one pass.

Compiled on first use for each argument type (a fraction of a second) and
cached next to this module (numba's ``cache=True``), so later processes load
it. ``protos.codec`` imports this module only when it checks an update: numba
costs ~0.2 s to import, and most processes that decode (organizations reading
a global) never check one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

#: independent running sums per slice (the summation order is part of the result)
LANES = 8



@njit(inline="always")
def _value(values: Any, base: Any, i: int) -> float:  # pragma: no cover - compiled
    if base is None:  # pruned at compile time: one specialization with a reference, one without
        return np.float64(values[i])
    return np.float64(values[i] - base[i])  # the difference in the inputs' dtype, then widened


@njit(nogil=True, cache=True, boundscheck=False)
def sum_of_squares(values: Any, base: Any = None) -> float:  # pragma: no cover - compiled
    """Σ float64(values − base)² (Σ float64(values)² without a base) over contiguous
    1-D arrays of one size, the difference taken in the inputs' dtype (float32 for
    two float32 arrays, as ``values - base`` is); float32 or float64 values.
    Releases the GIL while it runs."""
    n = values.size
    full = n - n % LANES
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    for i in range(0, full, LANES):
        d0 = _value(values, base, i)
        d1 = _value(values, base, i + 1)
        d2 = _value(values, base, i + 2)
        d3 = _value(values, base, i + 3)
        d4 = _value(values, base, i + 4)
        d5 = _value(values, base, i + 5)
        d6 = _value(values, base, i + 6)
        d7 = _value(values, base, i + 7)
        s0 += d0 * d0
        s1 += d1 * d1
        s2 += d2 * d2
        s3 += d3 * d3
        s4 += d4 * d4
        s5 += d5 * d5
        s6 += d6 * d6
        s7 += d7 * d7
    for i in range(full, n):
        d = _value(values, base, i)
        s0 += d * d
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(nogil=True, cache=True, boundscheck=False)
def slice_sums(values: Any, base: Any, chunk: int, out: Any) -> None:  # pragma: no cover - compiled
    """``out[j] = sum_of_squares(values[j·chunk : (j+1)·chunk], base[…])`` for every slice j of
    ``chunk`` values (the last may be shorter; ``out`` has one place per slice): a whole
    tensor's slice sums in one call, the same bits as one call per slice."""
    n = values.size
    for j in range(out.size):
        lo = j * chunk
        hi = min(lo + chunk, n)
        if base is None:
            out[j] = sum_of_squares(values[lo:hi], None)
        else:
            out[j] = sum_of_squares(values[lo:hi], base[lo:hi])
