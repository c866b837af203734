"""FedAvg (McMahan et al., 2017): the example-weighted mean of the adapters.

Streaming: a float64 running sum Σ nᵢ·wᵢ and Σ nᵢ — O(P) memory whatever the
number of replies. float64 also makes the result (rounded to float32 at the
end) insensitive to the order in which replies arrive, in all but
astronomically rare ties, which the resume-equals-uninterrupted invariant
relies on.

Updates are folded in two at a time: an accepted update is held until the
next one (or ``finish_round``), and the pair goes into the sums in one pass
(``kernels.add_scaled_all_two``), the same bits as one at a time. The float64
sums are most of the memory traffic, and this way they cross the memory bus
once per two replies; the cost is one update held a little longer.

Note this averages the A and B factors separately, as FlowerTune and
OpenFedLLM do; mean(B)·mean(A) is not mean(B·A). The exact alternative is a
separate strategy.
"""

from __future__ import annotations

import numpy as np

from protos.adapter import Adapter
from strategies.base import AggregationError, Strategy
from strategies.kernels import add_scaled_all, add_scaled_all_two
from strategies.registry import register_strategy


@register_strategy("fedavg")
class FedAvg(Strategy):
    """Example-weighted average of the organizations' adapters.

    Parameters: none. Each update is weighted by the number of local training
    examples its organization reported.
    """

    family = "classic"
    linear = True  # the weighted mean is the result: secure aggregation can feed it

    def __init__(self) -> None:
        self._sum: dict[str, np.ndarray] | None = None
        self._weight = 0.0
        self._global: Adapter | None = None
        self._held: tuple[Adapter, int] | None = None  # an accepted update not yet in the sums

    def begin_round(self, server_round: int, global_adapter: Adapter) -> None:
        self._global = global_adapter
        self._sum = {name: np.zeros(value.shape, dtype=np.float64) for name, value in global_adapter.items()}
        self._weight = 0.0
        self._held = None

    def accumulate(self, update: Adapter, num_examples: int) -> None:
        if self._sum is None:
            raise AggregationError("accumulate() before begin_round()")
        if num_examples <= 0:
            raise ValueError("num_examples must be positive")
        if update.keys() != self._sum.keys():
            raise ValueError("update tensors differ from the global adapter's")
        for name, total in self._sum.items():  # checked now: the sums take this update later
            if np.shape(update[name]) != total.shape:
                raise ValueError(f"update tensor {name} has shape {np.shape(update[name])}, "
                                 f"the global adapter's {total.shape}")
        # the caller drops the update; it is held until the next one so that both go into
        # the float64 sums in one pass (the sums are read and written once for two)
        if self._held is None:
            self._held = (update, num_examples)
        else:
            held, held_examples = self._held
            self._held = None
            add_scaled_all_two(self._sum, held, held_examples, update, num_examples)
        self._weight += float(num_examples)

    def running_sums(self) -> dict[str, np.ndarray]:
        """The float64 sums Σ nᵢ·wᵢ so far, every accepted update folded in."""
        if self._sum is None:
            raise AggregationError("running_sums() before begin_round()")
        self._fold_held()
        return self._sum

    def _fold_held(self) -> None:
        if self._held is not None and self._sum is not None:
            held, held_examples = self._held
            self._held = None
            # sum += n·update in float64, tensor by tensor, bit-identical to
            # np.add(sum, np.multiply(update, n, dtype=float64), out=sum) (strategies/kernels.py)
            add_scaled_all(self._sum, held, held_examples)

    def finish_round(self) -> Adapter:
        if self._sum is None or self._weight == 0.0:
            raise AggregationError("no update was accumulated this round")
        self._fold_held()
        sums, weight = self._sum, self._weight
        self._sum = None
        self._weight = 0.0
        result: Adapter = {}
        for name in list(sums):
            # divide in place (same values as total / weight) and free each float64
            # sum once rounded: the float32 result takes the place of the sums,
            # where a quotient array next to them needed 3·P·4 bytes at the end
            total = sums.pop(name)
            np.divide(total, weight, out=total)
            result[name] = total.astype(np.float32)
            del total
        return result
