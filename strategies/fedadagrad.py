"""FedAdagrad (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

Adagrad as the server optimizer over the pseudo-gradient (see fedopt.py):
v ← v + Δ². As in Flower's FedAdagrad, there is no first-moment averaging
(β₁ = 0, so m = Δ) and no bias correction.
"""

from __future__ import annotations

import numpy as np

from strategies.fedopt import FedOpt
from strategies.registry import register_strategy


@register_strategy("fedadagrad")
class FedAdagrad(FedOpt):
    """Server-side Adagrad over the organizations' weighted mean update.

    Parameters (defaults: Flower 1.41's ``flwr.serverapp.strategy.FedAdagrad``):
        eta: server learning rate η > 0 (default 0.1).
        tau: adaptivity τ > 0 (default 1e-3; Flower's legacy
            ``flwr.server.strategy.FedAdagrad`` used 1e-9).
    """

    def __init__(self, eta: float = 1e-1, tau: float = 1e-3) -> None:
        super().__init__(eta=eta, beta_1=0.0, beta_2=0.0, tau=tau)

    def _next_v(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v + delta_sq
