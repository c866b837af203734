"""Norm-bounded averaging (Sun et al., "Can You Really Backdoor Federated
Learning?", 2019).

Each update's delta (update − global) is scaled down, if needed, to an L2
norm of at most ``clip_norm`` over the whole adapter, then the clipped deltas
are averaged with the example weights and added to the global. A single
organization can then move the global by at most clip_norm·nᵢ/Σn.

Streaming in O(P): the norm is taken first (one pass over the update), the
scaled delta is then added to float64 running sums, as in FedAvg.
"""

from __future__ import annotations

import numpy as np

from protos.adapter import Adapter
from strategies.base import AggregationError, Strategy
from strategies.checks import check_float, check_num_examples, check_same_layout
from strategies.registry import register_strategy


@register_strategy("norm-bounded")
class NormBounded(Strategy):
    """Example-weighted mean of deltas clipped to an L2 norm bound.

    Parameters:
        clip_norm: the bound on each update's delta L2 norm, > 0 (default 1.0).
    """

    family = "robust"

    def __init__(self, clip_norm: float = 1.0) -> None:
        self.clip_norm = check_float(self.name, "clip_norm", clip_norm, low=0.0, low_open=True)
        self._global: Adapter | None = None
        self._sum: dict[str, np.ndarray] | None = None
        self._weight = 0.0
        self.clipped = 0  # updates scaled down this round, for logs

    def begin_round(self, server_round: int, global_adapter: Adapter) -> None:
        self._global = global_adapter
        self._sum = {k: np.zeros(v.shape, dtype=np.float64) for k, v in global_adapter.items()}
        self._weight = 0.0
        self.clipped = 0

    def accumulate(self, update: Adapter, num_examples: int) -> None:
        if self._global is None or self._sum is None:
            raise AggregationError("accumulate() before begin_round()")
        weight = check_num_examples(num_examples)
        check_same_layout(update, self._global)
        sq_norm = 0.0
        for key, base in self._global.items():
            delta = update[key].astype(np.float64) - base
            sq_norm += float(np.vdot(delta, delta))
        norm = float(np.sqrt(sq_norm))
        scale = 1.0 if norm <= self.clip_norm else self.clip_norm / norm
        self.clipped += scale < 1.0
        for key, total in self._sum.items():
            # recomputed, not kept from the norm pass: keeping it would double the memory per reply
            delta = update[key].astype(np.float64) - self._global[key]
            total += (weight * scale) * delta
        self._weight += weight

    def finish_round(self) -> Adapter:
        if self._global is None or self._sum is None or self._weight == 0.0:
            raise AggregationError("no update was accumulated this round")
        result = {
            key: (self._global[key].astype(np.float64) + total / self._weight).astype(np.float32)
            for key, total in self._sum.items()
        }
        self._global, self._sum, self._weight = None, None, 0.0
        return result
