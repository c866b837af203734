"""The common part of strategies whose organizations share only some LoRA factors.

``factor_plan["share"]`` names the factors an update carries; only those are
averaged (FedAvg's float64 sums, example-weighted), the others keep the
global's values. Tensors that are not LoRA factors are outside the plan and
are shared and averaged as in FedAvg.
"""

from __future__ import annotations

import numpy as np

from protos.adapter import Adapter
from strategies.base import AggregationError, Strategy
from strategies.checks import check_same_layout
from strategies.fedavg import FedAvg
from strategies.lora_rank import lora_factor, lora_pairs


def shared_part(adapter: Adapter, share: tuple[str, ...]) -> Adapter:
    """The tensors an organization sends under a factor plan's ``share`` list."""
    return {k: v for k, v in adapter.items() if lora_factor(k) is None or lora_factor(k) in share}


class PartialShare(Strategy):
    """FedAvg over the shared factors; subclasses set ``factor_plan``."""

    family = "lora"
    linear = True  # FedAvg over the shared factors

    def __init__(self) -> None:
        self._mean = FedAvg()
        self._global: Adapter | None = None
        self._shared: Adapter | None = None

    def begin_round(self, server_round: int, global_adapter: Adapter) -> None:
        lora_pairs(global_adapter)  # the global must hold both factors of every module
        self._global = global_adapter
        self._shared = shared_part(global_adapter, self.factor_plan["share"])
        self._mean.begin_round(server_round, self._shared)

    def accumulate(self, update: Adapter, num_examples: int) -> None:
        if self._shared is None:
            raise AggregationError("accumulate() before begin_round()")
        try:
            check_same_layout(update, self._shared)
        except ValueError as err:
            raise ValueError(f"{self.name} updates carry only {list(self.factor_plan['share'])}: {err}") from None
        self._mean.accumulate(update, num_examples)

    def finish_round(self) -> Adapter:
        if self._global is None:
            raise AggregationError("finish_round() before begin_round()")
        mean = self._mean.finish_round()
        result = {
            k: mean[k] if k in mean else np.array(v, dtype=np.float32, copy=True) for k, v in self._global.items()
        }
        self._global, self._shared = None, None
        return result
