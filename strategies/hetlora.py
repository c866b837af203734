"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of
On-Device Foundation Models", EMNLP 2024), basic aggregation.

Each organization trains its own rank rᵢ <= R (what its GPUs afford); the
global has rank R. Downlink: the global truncated to rᵢ (the first rᵢ rows
of each A, first rᵢ columns of each B; ``rank_reduction = "truncate"``,
computed by each organization, and ``adapter_for_rank`` here). Uplink: each
update is zero-padded back to R and the factors are averaged with the
example weights, A and B separately as in the paper's zero-padding
aggregation (its sparsity-weighted variant and rank self-pruning are not
implemented). Linear, so streaming in O(P) with FedAvg's float64 sums.

Scaling: the factors are averaged as they are. That is consistent because
the contract gives an organization at rank rᵢ the alpha R/rᵢ times smaller
(``protos.adapter.spec_for_rank``): alpha/r is the same at every rank, so
a truncated slice means the same update at rank rᵢ as inside the global.
"""

from __future__ import annotations

from protos.adapter import Adapter
from strategies.base import AggregationError, Strategy
from strategies.checks import check_same_layout
from strategies.fedavg import FedAvg
from strategies.lora_math import pad_adapter
from strategies.lora_rank import adapter_rank
from strategies.registry import register_strategy


@register_strategy("hetlora")
class HetLora(Strategy):
    """Weighted mean of zero-padded factors from organizations of different ranks.

    Parameters: none. The global rank R is the rank of the adapter passed to
    ``begin_round``; an update of rank rᵢ <= R is padded, a larger one refused.
    """

    family = "lora"
    #: organizations reduce the rank-R global by truncation (strategies/lora_rank.py)
    rank_reduction = "truncate"

    def __init__(self) -> None:
        self._mean = FedAvg()
        self._global: Adapter | None = None
        self._rank = 0

    def begin_round(self, server_round: int, global_adapter: Adapter) -> None:
        self._rank = adapter_rank(global_adapter)
        self._global = global_adapter
        self._mean.begin_round(server_round, global_adapter)

    def accumulate(self, update: Adapter, num_examples: int) -> None:
        if self._global is None:
            raise AggregationError("accumulate() before begin_round()")
        rank = adapter_rank(update)
        if rank > self._rank:
            raise ValueError(f"update has LoRA rank {rank}, above the global rank {self._rank}")
        padded = pad_adapter(update, self._rank)
        check_same_layout(padded, self._global)
        self._mean.accumulate(padded, num_examples)

    def finish_round(self) -> Adapter:
        self._global = None
        return self._mean.finish_round()
