"""Mapping a rank-R adapter to an organization's own rank r ≤ R.

With heterogeneous ranks the coordinator sends the rank-R global and each
organization reduces it to the rank it can afford. How it reduces is part of
the contract (the round config's ``rank_reduction``), so both sides share
this code:

* ``truncate`` (HetLoRA): keep the first r rows of A and columns of B.
* ``svd`` (FlexLoRA): the best rank-r approximation of the product B·A, from
  thin QRs of the factors and an R×R SVD — never the out×in matrix.

The LoRA scaling alpha/r is the same at every rank (protos.adapter.spec_for_rank),
so reducing the factors reduces the applied update B·A consistently.
"""

from __future__ import annotations

import numpy as np

from protos.adapter import LORA_A, LORA_B, Adapter

REDUCTIONS = ("none", "truncate", "svd")


def module_pairs(adapter: Adapter) -> dict[str, tuple[str, str]]:
    """LoRA module prefix → (A key, B key)."""
    pairs: dict[str, tuple[str, str]] = {}
    for name in adapter:
        if f".{LORA_A}." in name:
            prefix = name.split(f".{LORA_A}.")[0]
            b_name = name.replace(f".{LORA_A}.", f".{LORA_B}.")
            if b_name not in adapter:
                raise ValueError(f"{name} has no matching {LORA_B}")
            pairs[prefix] = (name, b_name)
    return pairs


def adapter_rank(adapter: Adapter) -> int:
    ranks = {adapter[a].shape[0] for a, _ in module_pairs(adapter).values()}
    if len(ranks) != 1:
        raise ValueError(f"adapter mixes ranks {sorted(ranks)}")
    return ranks.pop()


def truncate_adapter(adapter: Adapter, rank: int) -> Adapter:
    out: Adapter = {}
    for a_name, b_name in module_pairs(adapter).values():
        if rank > adapter[a_name].shape[0]:
            raise ValueError(f"cannot truncate rank {adapter[a_name].shape[0]} up to {rank}")
        out[a_name] = np.ascontiguousarray(adapter[a_name][:rank])
        out[b_name] = np.ascontiguousarray(adapter[b_name][:, :rank])
    return out


def svd_factors(b: np.ndarray, a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced rank-``rank`` factors (B', A') of the best approximation of b @ a."""
    q_b, r_b = np.linalg.qr(b.astype(np.float64))          # out×k, k×k
    q_a, r_a = np.linalg.qr(a.astype(np.float64).T)        # in×k,  k×k
    u, s, vt = np.linalg.svd(r_b @ r_a.T)                  # k×k
    k = min(rank, s.size)
    root = np.sqrt(s[:k])
    new_b = (q_b @ u[:, :k]) * root
    new_a = (root[:, None] * vt[:k]) @ q_a.T
    if k < rank:  # the product has lower rank than asked: pad with zeros
        new_b = np.pad(new_b, ((0, 0), (0, rank - k)))
        new_a = np.pad(new_a, ((0, rank - k), (0, 0)))
    return new_b.astype(np.float32), new_a.astype(np.float32)


def svd_reduce(adapter: Adapter, rank: int) -> Adapter:
    out: Adapter = {}
    for a_name, b_name in module_pairs(adapter).values():
        out[b_name], out[a_name] = svd_factors(adapter[b_name], adapter[a_name], rank)
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
    raise ValueError(f"rank {rank} differs from the global rank {current} and rank-reduction is {method!r}; "
                     f"use a strategy for heterogeneous ranks (hetlora, flexlora)")
