"""An adapter (name → tensor) as one flat vector and back, in sorted-name order.

Secure aggregation masks one vector of P values per organization; both sides
derive its layout from the tensors' names and shapes, which the round's
expectation already fixes, so the order never travels.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

Layout = tuple[tuple[str, tuple[int, ...]], ...]


def layout_of(shapes: Mapping[str, tuple[int, ...]] | Mapping[str, np.ndarray]) -> Layout:
    return tuple(
        (name, tuple(int(d) for d in (value.shape if isinstance(value, np.ndarray) else value)))
        for name, value in sorted(shapes.items())
    )


def size_of(layout: Layout) -> int:
    return sum(math.prod(shape) for _, shape in layout)


def flatten(tensors: Mapping[str, np.ndarray], layout: Layout) -> np.ndarray:
    """float32 vector of the tensors in the layout's order (shapes must match)."""
    out = np.empty(size_of(layout), dtype=np.float32)
    offset = 0
    for name, shape in layout:
        value = np.asarray(tensors[name])
        if tuple(value.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(value.shape)}, layout says {shape}")
        out[offset : offset + value.size] = value.reshape(-1)
        offset += value.size
    return out


def unflatten(vector: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """Tensors (copies, float32) from a vector in the layout's order."""
    if vector.size != size_of(layout):
        raise ValueError(f"vector of {vector.size} values, layout holds {size_of(layout)}")
    out, offset = {}, 0
    for name, shape in layout:
        n = math.prod(shape)
        out[name] = np.array(vector[offset : offset + n], dtype=np.float32).reshape(shape)
        offset += n
    return out
