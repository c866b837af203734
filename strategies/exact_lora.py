"""Exact LoRA aggregation: the weighted mean of the products B·A, re-factored.

FedAvg averages A and B separately, and mean(B)·mean(A) ≠ mean(B·A): the
cross terms are noise the organizations never trained. Here the new global
is the best rank-r approximation of the true mean
M = Σ wᵢ·Bᵢ·Aᵢ (wᵢ = nᵢ/Σn) for each adapted module, as in FLoRA (Wang et
al., NeurIPS 2024: stacking) and FedEx-LoRA (Singhal et al., NAACL 2025:
exact aggregation with a residual), re-factored without forming the
out × in matrix: [w₁B₁ … w_NB_N] and [A₁; …; A_N] are stacked (N·r wide), a
thin QR of each and the SVD of the small (N·r × N·r) core give M's top-r
singular triplets (lora_rank.svd_of_sum), split as balanced factors
B' = U_r·√S_r, A' = √S_r·V_rᵀ. All organizations share the rank r and alpha,
so the LoRA scaling alpha/r is common and B·A is aggregated unscaled.

M has rank up to N·r, the global keeps rank r, so truncation loses the tail.
With ``residual=True`` the tail E_t = (M_t + E_{t−1}) − B'A' is kept as the
strategy state (as factors, in float64) and added to the next round's mean
before truncation (error feedback): over rounds the applied changes plus the
final residual sum to exactly the sum of the exact mean changes — nothing is
lost, only delayed. (FedEx-LoRA folds that residual into the frozen base
weights instead; we cannot, the base model is not ours to send.) The
residual's rank is at most min(out, in).

Memory: every update is kept until the round ends (N× the adapter;
``needs_every_update``, capped by ``max_updates``). Tensors that are not LoRA
factors are averaged as FedAvg does.
"""

from __future__ import annotations

import numpy as np

from protos.adapter import Adapter
from strategies.checks import check_bool
from strategies.collect import DEFAULT_MAX_UPDATES, CollectingStrategy, stacked
from strategies.lora_math import tail_factors
from strategies.lora_rank import adapter_rank, balanced_factors, lora_pairs, svd_of_sum
from strategies.registry import register_strategy

_RES = "residual/"


@register_strategy("exact-lora")
class ExactLora(CollectingStrategy):
    """Best rank-r approximation of the example-weighted mean of B·A (keeps every update).

    Parameters:
        residual: keep the truncated remainder as state and add it to the next
            round's mean (error feedback); default False.
        max_updates: most updates accepted in one round, >= 1 (default 256).
    """

    family = "lora"

    def __init__(self, residual: bool = False, max_updates: int = DEFAULT_MAX_UPDATES) -> None:
        super().__init__(max_updates=max_updates)
        self.residual = check_bool(self.name, "residual", residual)
        # module prefix → (B_E out × k, A_E k × in), float64
        self._residual: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def begin_round(self, server_round: int, global_adapter: Adapter) -> None:
        pairs = lora_pairs(global_adapter)
        for prefix, (b_res, a_res) in self._residual.items():
            if prefix not in pairs:
                raise ValueError(f"the saved exact-lora residual names module {prefix!r}, absent from the global")
            a_key, b_key = pairs[prefix]
            if b_res.shape[0] != global_adapter[b_key].shape[0] or a_res.shape[1] != global_adapter[a_key].shape[1]:
                raise ValueError(f"the saved exact-lora residual of {prefix!r} does not fit the global's shapes")
        super().begin_round(server_round, global_adapter)

    def _aggregate(self, global_adapter: Adapter, updates: list[Adapter], weights: np.ndarray) -> Adapter:
        rank = adapter_rank(global_adapter)
        w = weights / weights.sum()
        pairs = lora_pairs(global_adapter)
        factor_keys = {k for pair in pairs.values() for k in pair}
        result: Adapter = {
            key: np.tensordot(w, stacked(updates, key), axes=1).astype(np.float32)
            for key in global_adapter
            if key not in factor_keys
        }
        new_residual: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for prefix, (a_key, b_key) in pairs.items():
            b_blocks = [wi * u[b_key].astype(np.float64) for wi, u in zip(w, updates)]
            a_blocks = [u[a_key] for u in updates]
            if self.residual and prefix in self._residual:
                b_res, a_res = self._residual[prefix]
                b_blocks.append(b_res)
                a_blocks.append(a_res)
            u_, s, vt = svd_of_sum(b_blocks, a_blocks)
            b, a = balanced_factors(u_, s, vt, rank)
            result[a_key], result[b_key] = a.astype(np.float32), b.astype(np.float32)
            if self.residual:
                b_tail, a_tail = tail_factors(u_, s, vt, rank)
                if b_tail.shape[1]:
                    new_residual[prefix] = (b_tail, a_tail)
        # committed only when every module succeeded
        self._residual = new_residual
        return {key: result[key] for key in global_adapter}

    def state_dict(self) -> dict[str, np.ndarray]:
        state: dict[str, np.ndarray] = {}
        for prefix, (b_res, a_res) in self._residual.items():
            state[f"{_RES}{prefix}.lora_B"] = b_res.copy()
            state[f"{_RES}{prefix}.lora_A"] = a_res.copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state and not self.residual:
            raise ValueError("strategy 'exact-lora' with residual=False keeps no state, got a residual")
        residual: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for key in state:
            if not (key.startswith(_RES) and key.endswith(".lora_B")):
                if key.startswith(_RES) and key.endswith(".lora_A"):
                    continue
                raise ValueError(f"strategy 'exact-lora': unexpected state key {key!r}")
            prefix = key[len(_RES) : -len(".lora_B")]
            a_key = f"{_RES}{prefix}.lora_A"
            if a_key not in state:
                raise ValueError(f"strategy 'exact-lora': state has {key!r} without {a_key!r}")
            b_res, a_res = np.array(state[key], np.float64), np.array(state[a_key], np.float64)
            if b_res.ndim != 2 or a_res.ndim != 2 or b_res.shape[1] != a_res.shape[0]:
                raise ValueError(f"strategy 'exact-lora': residual factors of {prefix!r} do not pair")
            residual[prefix] = (b_res, a_res)
        if len(state) != 2 * len(residual):
            raise ValueError("strategy 'exact-lora': residual state has an A factor without its B")
        self._residual = residual
