"""Pure LoRA algebra on adapters: pairing factors, changing rank, exact refactoring.

An adapter holds, per adapted module ``X``, ``X.lora_A.weight`` (r × in) and
``X.lora_B.weight`` (out × r); the update PEFT applies is (alpha/r)·B@A.
Everything here works on the factors and never forms an out × in matrix:
the product of stacked factors is refactored by two thin QRs and the SVD of a
small core (``svd_of_sum``), so the cost is O((out + in)·K²) for K stacked
ranks instead of O(out·in·K).

Tensors that are not LoRA factors (none in today's layouts) pass through
the rank changes unchanged.

Rank reduction, pairing and the exact refactoring live in ``protos.lora_rank``
(the contract: organizations reduce the global to their own rank with the
same code); what this module adds is the server's side: padding and residual
tails.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from protos.adapter import LORA_A, LORA_B, Adapter
from protos.lora_rank import (  # noqa: F401  (re-exported: the server's algebra builds on the contract's)
    _check_rank,
    _zero_tolerance,
    adapter_rank,
    balanced_factors,
    lora_factor,
    lora_pairs,
    svd_of_sum,
    svd_reduce,
    truncate_adapter,
)

_A_TAG = f".{LORA_A}."
_B_TAG = f".{LORA_B}."


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


