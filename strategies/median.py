"""Coordinate-wise median (Yin et al., "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates", ICML 2018; Flower's FedMedian).

Each coordinate of the new global is the median of that coordinate over the
round's updates: unweighted, as in the paper and in Flower, because a
weight is a claim a malicious organization could inflate. It tolerates
fewer than half of the updates being arbitrary.
"""

from __future__ import annotations

import numpy as np

from protos.adapter import Adapter
from strategies.collect import DEFAULT_MAX_UPDATES, CollectingStrategy, stacked
from strategies.registry import register_strategy


@register_strategy("median")
class Median(CollectingStrategy):
    """Coordinate-wise median of the updates (keeps every update).

    Parameters:
        max_updates: most updates accepted in one round, >= 1 (default 256).
    """

    family = "robust"

    def __init__(self, max_updates: int = DEFAULT_MAX_UPDATES) -> None:
        super().__init__(max_updates=max_updates)

    def _aggregate(self, global_adapter: Adapter, updates: list[Adapter], weights: np.ndarray) -> Adapter:
        # float64: an even count averages the two middle values without float32 rounding
        return {key: np.median(stacked(updates, key), axis=0).astype(np.float32) for key in global_adapter}
