"""Krum and Multi-Krum (Blanchard et al., "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017; Flower's
Krum / MultiKrum).

Each update's score is the sum of squared L2 distances (over the whole
adapter) to its n − f − 2 nearest other updates; the m lowest-scoring
updates are averaged, weighted by their example counts as Flower does
(m = 1: Krum, the single best update). The guarantee needs n > 2f + 2, so a
round with fewer updates is refused instead of being silently unprotected.

Distances come from the Gram matrix of the deltas (update − global) in
float64, one tensor at a time: BLAS speed, no n × P matrix, and measuring
from the global avoids the cancellation of ‖x‖² + ‖y‖² − 2x·y on the large
common part. Ties in the score go to the earlier arrival.
"""

from __future__ import annotations

import numpy as np

from protos.adapter import Adapter
from strategies.base import AggregationError
from strategies.checks import check_int
from strategies.collect import DEFAULT_MAX_UPDATES, CollectingStrategy, stacked
from strategies.registry import register_strategy


def krum_scores(sq_distances: np.ndarray, num_malicious: int) -> np.ndarray:
    """Krum score of each row: the sum of its n − f − 2 smallest distances to the others."""
    n = sq_distances.shape[0]
    k = n - num_malicious - 2
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        others = np.delete(sq_distances[i], i)
        scores[i] = np.sort(others)[:k].sum()
    return scores


@register_strategy("krum")
class Krum(CollectingStrategy):
    """(Multi-)Krum selection followed by the weighted mean of the selected (keeps every update).

    Parameters:
        num_malicious: f, the number of Byzantine organizations tolerated, >= 0
            (default 0). A round needs n > 2f + 2 updates.
        num_to_select: m, updates averaged, >= 1 (default 1 = Krum; > 1 =
            Multi-Krum). A round needs m <= n − f.
        max_updates: most updates accepted in one round, >= 1 (default 256).
    """

    family = "robust"

    def __init__(self, num_malicious: int = 0, num_to_select: int = 1, max_updates: int = DEFAULT_MAX_UPDATES) -> None:
        super().__init__(max_updates=max_updates)
        self.num_malicious = check_int(self.name, "num_malicious", num_malicious, low=0)
        self.num_to_select = check_int(self.name, "num_to_select", num_to_select, low=1)
        self.last_selected: list[int] = []  # arrival indices chosen in the last round, for logs and tests

    def _aggregate(self, global_adapter: Adapter, updates: list[Adapter], weights: np.ndarray) -> Adapter:
        n, f, m = len(updates), self.num_malicious, self.num_to_select
        if n <= 2 * f + 2:
            raise AggregationError(f"krum with num_malicious={f} needs more than {2 * f + 2} updates, got {n}")
        if m > n - f:
            raise AggregationError(f"krum cannot select num_to_select={m} of {n} updates with num_malicious={f}")
        gram = np.zeros((n, n), dtype=np.float64)
        for key, base in global_adapter.items():
            deltas = stacked(updates, key).reshape(n, -1) - base.astype(np.float64).reshape(1, -1)
            gram += deltas @ deltas.T
        norms = np.diag(gram)
        sq_distances = np.maximum(norms[:, None] + norms[None, :] - 2.0 * gram, 0.0)
        chosen = np.argsort(krum_scores(sq_distances, f), kind="stable")[:m]
        self.last_selected = [int(i) for i in chosen]
        w = weights[chosen] / weights[chosen].sum()
        return {
            key: np.tensordot(w, stacked([updates[i] for i in chosen], key), axes=1).astype(np.float32)
            for key in global_adapter
        }
