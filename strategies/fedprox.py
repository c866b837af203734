"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

The server side is FedAvg unchanged; what FedProx adds happens on the
organizations: each local objective gets the proximal term
μ/2·‖w − w_global‖², which keeps heterogeneous silos from drifting far from
the global adapter. The strategy only tells them μ, through the round config
entry ``proximal-mu`` (the same key as Flower's FedProx).
"""

from __future__ import annotations

from typing import Any

from protos.adapter import Adapter
from strategies.checks import check_float, check_same_layout
from strategies.fedavg import FedAvg
from strategies.registry import register_strategy


@register_strategy("fedprox")
class FedProx(FedAvg):
    """FedAvg aggregation plus the proximal-term weight sent to the organizations.

    Parameters:
        mu: proximal-term weight μ >= 0 (default 0.01). μ = 0 is plain FedAvg.
            (Flower's default is 0.0; the paper tunes μ in {0.001, 0.01, 0.1, 1}.)
    """

    def __init__(self, mu: float = 0.01) -> None:
        super().__init__()
        self.mu = check_float(self.name, "mu", mu, low=0.0)

    def configure_train(self, server_round: int) -> dict[str, Any]:
        return {"proximal-mu": self.mu}

    def accumulate(self, update: Adapter, num_examples: int) -> None:
        if self._global is not None:
            check_same_layout(update, self._global)  # FedAvg checks names only; numpy would broadcast shapes
        super().accumulate(update, num_examples)
