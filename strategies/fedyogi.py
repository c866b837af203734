"""FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

Yogi as the server optimizer over the pseudo-gradient (see fedopt.py):
v ← v − (1 − β₂)·Δ²·sign(v − Δ²), whose additive update keeps v from
growing or shrinking as fast as Adam's. No bias correction, as in the paper
and in Flower's FedYogi.
"""

from __future__ import annotations

import numpy as np

from strategies.fedopt import FedOpt
from strategies.registry import register_strategy


@register_strategy("fedyogi")
class FedYogi(FedOpt):
    """Server-side Yogi over the organizations' weighted mean update.

    Parameters (defaults: Flower 1.41's ``flwr.serverapp.strategy.FedYogi``):
        eta: server learning rate η > 0 (default 1e-2).
        beta_1: first-moment decay in [0, 1) (default 0.9).
        beta_2: second-moment decay in [0, 1) (default 0.99).
        tau: adaptivity τ > 0 (default 1e-3).
    """

    def __init__(self, eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def _next_v(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta_2) * delta_sq * np.sign(v - delta_sq)
