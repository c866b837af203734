"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models
under Heterogeneous Tasks and Client Resources", NeurIPS 2024).

Organizations train different ranks rᵢ <= R. The server averages the full
updates ΔWᵢ = Bᵢ·Aᵢ, weighted by examples, and re-factors the mean to the
global rank R by SVD (exactly, from the stacked factors:
lora_rank.svd_of_sum; the out × in matrix is never formed). Each
organization then starts from the global re-factored down to its own rank,
the best rank-rᵢ approximation of B·A (``rank_reduction = "svd"``, computed
by each organization with strategies/lora_rank.py; ``adapter_for_rank`` here).

Scaling: PEFT applies alpha/r. The contract gives an organization at rank rᵢ
the alpha R/rᵢ times smaller (``protos.adapter.spec_for_rank``), so alpha/r
is the same at every rank and the products are averaged unscaled: the mean
of Bᵢ·Aᵢ is the mean of the applied updates up to that common factor. (With
one alpha for all ranks, each product would have to be weighted by R/rᵢ and
the downlink by rᵢ/R; ``lora_rank.svd_reduce`` takes that ``scale``.)

Memory: every update is kept until the round ends (``needs_every_update``,
capped by ``max_updates``). Tensors that are not LoRA factors are averaged as
FedAvg does.
"""

from __future__ import annotations

import numpy as np

from protos.adapter import Adapter
from strategies.collect import DEFAULT_MAX_UPDATES, CollectingStrategy, stacked
from strategies.lora_rank import adapter_rank, balanced_factors, lora_pairs, svd_of_sum
from strategies.registry import register_strategy


@register_strategy("flexlora")
class FlexLora(CollectingStrategy):
    """Weighted mean of full LoRA products of mixed ranks, SVD-refactored to the global rank.

    Parameters:
        max_updates: most updates accepted in one round, >= 1 (default 256).
    """

    family = "lora"
    #: organizations reduce the rank-R global by SVD (strategies/lora_rank.py)
    rank_reduction = "svd"

    def __init__(self, max_updates: int = DEFAULT_MAX_UPDATES) -> None:
        super().__init__(max_updates=max_updates)

    def _check_update(self, update: Adapter) -> None:
        assert self._global is not None
        if update.keys() != self._global.keys():
            raise ValueError("update tensors differ from the global adapter's")
        rank, global_rank = adapter_rank(update), adapter_rank(self._global)
        if rank > global_rank:
            raise ValueError(f"update has LoRA rank {rank}, above the global rank {global_rank}")
        pairs = lora_pairs(self._global)
        for a_key, b_key in pairs.values():
            module_shape = (self._global[b_key].shape[0], self._global[a_key].shape[1])
            if (update[b_key].shape[0], update[a_key].shape[1]) != module_shape:
                raise ValueError(f"update factors {a_key!r}/{b_key!r} do not fit the global's module shape")
        factor_keys = {k for pair in pairs.values() for k in pair}
        for key, value in self._global.items():
            if key not in factor_keys and update[key].shape != value.shape:
                raise ValueError(f"update tensor {key!r} has shape {update[key].shape}, the global has {value.shape}")

    def _aggregate(self, global_adapter: Adapter, updates: list[Adapter], weights: np.ndarray) -> Adapter:
        global_rank = adapter_rank(global_adapter)
        w = weights / weights.sum()
        pairs = lora_pairs(global_adapter)
        factor_keys = {k for pair in pairs.values() for k in pair}
        result: Adapter = {
            key: np.tensordot(w, stacked(updates, key), axes=1).astype(np.float32)
            for key in global_adapter
            if key not in factor_keys
        }
        for a_key, b_key in pairs.values():
            # blocks of different widths rᵢ stack the same way: Σ wᵢBᵢAᵢ = [w₁B₁ … w_NB_N][A₁; …; A_N]
            u_, s, vt = svd_of_sum(
                [wi * u[b_key].astype(np.float64) for wi, u in zip(w, updates)],
                [u[a_key] for u in updates],
            )
            b, a = balanced_factors(u_, s, vt, global_rank)
            result[a_key], result[b_key] = a.astype(np.float32), b.astype(np.float32)
        return {key: result[key] for key in global_adapter}
