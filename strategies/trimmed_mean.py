"""Coordinate-wise trimmed mean (Yin et al., "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates", ICML 2018; Flower's
FedTrimmedAvg).

For each coordinate, the k = ⌊β·n⌋ largest and k smallest of the n values
are dropped and the rest averaged, unweighted (as in the paper and in
Flower; scipy's ``trim_mean`` convention).
"""

from __future__ import annotations

import numpy as np

from protos.adapter import Adapter
from strategies.checks import check_float
from strategies.collect import DEFAULT_MAX_UPDATES, CollectingStrategy, stacked
from strategies.registry import register_strategy


@register_strategy("trimmed-mean")
class TrimmedMean(CollectingStrategy):
    """Coordinate-wise β-trimmed mean of the updates (keeps every update).

    Parameters:
        beta: fraction trimmed at each end, in [0, 0.5) (default 0.2, as
            Flower). β = 0 is the unweighted mean.
        max_updates: most updates accepted in one round, >= 1 (default 256).
    """

    family = "robust"

    def __init__(self, beta: float = 0.2, max_updates: int = DEFAULT_MAX_UPDATES) -> None:
        super().__init__(max_updates=max_updates)
        self.beta = check_float(self.name, "beta", beta, low=0.0, high=0.5, high_open=True)

    def _aggregate(self, global_adapter: Adapter, updates: list[Adapter], weights: np.ndarray) -> Adapter:
        n = len(updates)
        cut = int(self.beta * n)  # beta < 0.5 leaves at least one value
        result: Adapter = {}
        for key in global_adapter:
            values = np.sort(stacked(updates, key), axis=0)
            result[key] = values[cut : n - cut].mean(axis=0).astype(np.float32)
        return result
