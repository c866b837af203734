"""The compiled loops behind ``strategies.kernels``' large-tensor path (numba).

``total[i] += weight · float64(values[i])`` element by element, in one pass: the
float32 value is widened (exact), multiplied by the float64 weight and added to
the float64 sum — the very multiply and add of
``np.add(total, np.multiply(values, weight, dtype=np.float64), out=total)``,
each rounded as IEEE float64 (numba compiles without fast-math, so LLVM may not
fuse them into one multiply-add), hence the same bits.

``add_two`` folds two updates into the sums in one pass, first ``a`` then
``b`` for every element — the same two roundings per element as two calls, in
the same order, so the same bits — while the float64 sums, the bulk of the
memory traffic (read and written: 16 bytes a parameter against 4 for a
float32 update), cross the memory bus once for both.

Imported by ``strategies.kernels`` on first use (numba costs ~0.2 s to import);
compiled once per argument type and cached next to this module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit


@njit(nogil=True, cache=True, boundscheck=False)
def add_one(total: Any, values: Any, weight: float) -> None:  # pragma: no cover - compiled
    """total += weight · values, for 1-D float64 ``total`` and float32 ``values`` of one size."""
    for i in range(total.size):
        total[i] += weight * np.float64(values[i])


@njit(nogil=True, cache=True, boundscheck=False)
def add_two(total: Any, a: Any, weight_a: float, b: Any, weight_b: float) -> None:  # pragma: no cover - compiled
    """total += weight_a · a, then total += weight_b · b, element by element, in one pass."""
    for i in range(total.size):
        t = total[i] + weight_a * np.float64(a[i])
        total[i] = t + weight_b * np.float64(b[i])
