"""Mapping a rank-R adapter to an organization's own rank r ≤ R.

With heterogeneous ranks the coordinator sends the rank-R global and each
organization reduces it to the rank it can afford. How it reduces is named by
the round config's ``rank_reduction``, so both sides run this same code (the
organizations through clients/round_work.py, the coordinator through
``Strategy.adapter_for_rank``); strategies/lora_math.py adds what only the
server needs (padding, residual tails):

* ``truncate`` (HetLoRA): keep the first r rows of A and columns of B.
* ``svd`` (FlexLoRA): the best rank-r approximation of the product B·A, from
  thin QRs of the factors and a small SVD — never the out×in matrix.

The LoRA scaling alpha/r is the same at every rank (protos.adapter.spec_for_rank),
so reducing the factors reduces the applied update B·A consistently.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from protos.adapter import LORA_A, LORA_B, Adapter

REDUCTIONS = ("none", "truncate", "svd")

_A_TAG = f".{LORA_A}."
_B_TAG = f".{LORA_B}."


def lora_factor(key: str) -> str | None:
    """``"lora_A"``, ``"lora_B"``, or None for a tensor that is not a LoRA factor."""
    if _A_TAG in key:
        return LORA_A
    if _B_TAG in key:
        return LORA_B
    return None


def lora_pairs(adapter: Adapter) -> dict[str, tuple[str, str]]:
    """Module prefix → (A key, B key); a factor without its partner is an error."""
    pairs: dict[str, tuple[str, str]] = {}
    for key in adapter:
        if lora_factor(key) == LORA_A:
            prefix, suffix = key.split(_A_TAG, 1)
            b_key = f"{prefix}{_B_TAG}{suffix}"
            if b_key not in adapter:
                raise ValueError(f"LoRA factor {key!r} has no matching {b_key!r}")
            pairs[prefix] = (key, b_key)
    paired_b = {b for _, b in pairs.values()}
    lonely = [k for k in adapter if lora_factor(k) == LORA_B and k not in paired_b]
    if lonely:
        raise ValueError(f"LoRA factor {lonely[0]!r} has no matching lora_A")
    return pairs


def adapter_rank(adapter: Adapter) -> int:
    """The LoRA rank shared by every module of the adapter."""
    ranks = set()
    for a_key, b_key in lora_pairs(adapter).values():
        a, b = adapter[a_key], adapter[b_key]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA factors {a_key!r} {a.shape} and {b_key!r} {b.shape} do not pair")
        ranks.add(a.shape[0])
    if not ranks:
        raise ValueError("the adapter has no LoRA factors")
    if len(ranks) > 1:
        raise ValueError(f"the adapter mixes LoRA ranks {sorted(ranks)}")
    return ranks.pop()


def _check_rank(rank: int, current: int, verb: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if verb == "pad" and rank < current:
        raise ValueError(f"cannot pad a rank-{current} adapter to rank {rank}")
    if verb != "pad" and rank > current:
        raise ValueError(f"cannot {verb} a rank-{current} adapter to the larger rank {rank}")


def truncate_adapter(adapter: Adapter, rank: int) -> Adapter:
    """HetLoRA's downlink: the first ``rank`` rows of each A and columns of each B."""
    _check_rank(rank, adapter_rank(adapter), "truncate")
    out: Adapter = {}
    for key, value in adapter.items():
        factor = lora_factor(key)
        if factor == LORA_A:
            value = value[:rank, :]
        elif factor == LORA_B:
            value = value[:, :rank]
        # a slice is a view: copy, so the result never aliases the global
        out[key] = np.array(value, dtype=np.float32, copy=True, order="C")
    return out


def svd_of_sum(
    b_blocks: Sequence[np.ndarray], a_blocks: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD (U, s, Vt) of Σ_k B_k @ A_k, in float64, never forming the sum.

    [B_1 … B_N] = Q_B R_B and [A_1; …; A_N]ᵀ = Q_A R_A, so the sum is
    Q_B (R_B R_Aᵀ) Q_Aᵀ; the SVD of the small core R_B R_Aᵀ = u s vt gives
    U = Q_B u and Vt = vt Q_Aᵀ, with orthonormal columns and rows.
    """
    b = np.concatenate([np.asarray(x, dtype=np.float64) for x in b_blocks], axis=1)
    a = np.concatenate([np.asarray(x, dtype=np.float64) for x in a_blocks], axis=0)
    q_b, r_b = np.linalg.qr(b)
    q_a, r_a = np.linalg.qr(a.T)
    u, s, vt = np.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ u, s, vt @ q_a.T


def _zero_tolerance(s: np.ndarray, shape: tuple[int, int]) -> float:
    # the usual numerical-rank cut-off (as numpy.linalg.matrix_rank)
    return float(s[0]) * max(shape) * np.finfo(np.float64).eps if s.size else 0.0


def balanced_factors(
    u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) of rank ``rank`` with B@A = the top-``rank`` part of u·diag(s)·vt.

    The split is balanced: B = U_r·√S_r, A = √S_r·V_rᵀ. A direction whose
    singular value is numerically zero gets a zero column in B and the unit
    singular vector as its row of A instead of two zeros — the product is the
    same, but like LoRA's own initialisation (B = 0, A ≠ 0) it can still be
    trained; with both factors zero its gradient would vanish forever.
    """
    out_dim, in_dim = u.shape[0], vt.shape[1]
    k = min(rank, s.size)
    alive = s[:k] > _zero_tolerance(s, (out_dim, in_dim))
    root = np.sqrt(np.where(alive, s[:k], 0.0))
    b = np.zeros((out_dim, rank), dtype=np.float64)
    a = np.zeros((rank, in_dim), dtype=np.float64)
    b[:, :k] = u[:, :k] * root
    a[:k, :] = np.where(alive[:, None], root[:, None] * vt[:k, :], vt[:k, :])
    return b, a


def svd_reduce(adapter: Adapter, rank: int, scale: float = 1.0) -> Adapter:
    """The best rank-``rank`` approximation of each module's ``scale``·B@A, as balanced factors.

    Exact (Eckart–Young) via ``svd_of_sum`` on the factors; the out × in
    product is never formed. ``scale`` lets a caller change the LoRA scaling
    convention (e.g. r/R when an organization applies alpha/r instead of alpha/R).
    """
    _check_rank(rank, adapter_rank(adapter), "reduce")
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    out: Adapter = {key: np.array(value, dtype=np.float32, copy=True) for key, value in adapter.items()}
    for a_key, b_key in lora_pairs(adapter).values():
        u, s, vt = svd_of_sum([scale * adapter[b_key].astype(np.float64)], [adapter[a_key]])
        b, a = balanced_factors(u, s, vt, rank)
        out[a_key], out[b_key] = a.astype(np.float32), b.astype(np.float32)
    return out


def reduce_adapter(adapter: Adapter, rank: int, method: str) -> Adapter:
    """The global adapter at an organization's own rank, by the job's method."""
    current = adapter_rank(adapter)
    if rank == current:
        return adapter
    if rank > current:
        raise ValueError(f"organization rank {rank} exceeds the global rank {current}")
    if method == "truncate":
        return truncate_adapter(adapter, rank)
    if method == "svd":
        return svd_reduce(adapter, rank)
    # the coordinator refuses such a job up front, naming the strategies that reduce ranks (server/job_config.py)
    raise ValueError(f"rank {rank} differs from the global rank {current} and rank-reduction is {method!r} "
                     "(a strategy for heterogeneous ranks reduces by 'truncate' or 'svd')")
