"""The coordinator's side of the LoRA algebra: padding up to a rank, residual tails.

An adapter holds, per adapted module ``X``, ``X.lora_A.weight`` (r × in) and
``X.lora_B.weight`` (out × r); the update PEFT applies is (alpha/r)·B@A.
Pairing, rank reduction and the exact refactoring of stacked factors live in
``strategies.lora_rank``, which the organizations run too (they reduce the
global to their own rank with the same code); this module adds what only the
coordinator does. Tensors that are not LoRA factors pass through unchanged.
"""

from __future__ import annotations

import numpy as np

from protos.adapter import LORA_A, LORA_B, Adapter
from strategies.lora_rank import _check_rank, _zero_tolerance, adapter_rank, lora_factor


def pad_adapter(adapter: Adapter, rank: int) -> Adapter:
    """HetLoRA's uplink alignment: zero rows of A and zero columns of B up to ``rank``."""
    current = adapter_rank(adapter)
    _check_rank(rank, current, "pad")
    out: Adapter = {}
    for key, value in adapter.items():
        factor = lora_factor(key)
        if factor == LORA_A:
            padded = np.zeros((rank, value.shape[1]), dtype=np.float32)
            padded[:current, :] = value
        elif factor == LORA_B:
            padded = np.zeros((value.shape[0], rank), dtype=np.float32)
            padded[:, :current] = value
        else:
            padded = np.array(value, dtype=np.float32, copy=True)
        out[key] = padded
    return out


def tail_factors(u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced (B, A) of what ``balanced_factors(u, s, vt, rank)`` leaves out.

    Numerically zero singular values are dropped, so the width is the rank of
    the remainder (possibly 0).
    """
    keep = np.flatnonzero(s > _zero_tolerance(s, (u.shape[0], vt.shape[1])))
    keep = keep[keep >= rank]
    root = np.sqrt(s[keep])
    return u[:, keep] * root, root[:, None] * vt[keep, :]


